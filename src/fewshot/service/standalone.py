"""Export a taught workspace as one standalone ONNX classifier plus a labels file: the service
gathers what the workspace's decision reads (`Recogniser.decision_state`) and hands it, as plain
data, to `fewshot.artifacts.workspace.build_classifier` (which describes the classifier)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fewshot.artifacts.bundle import Bundle, Manifest, load_bundle
from fewshot.artifacts.workspace import (
    LABELS_FILE,
    MIN_OPSET,
    MODEL_FILE,
    PIXELS,
    Standalone,
    TaughtClasses,
    build_classifier,
)
from fewshot.errors import ConfigError
from fewshot.service.heads import service_head
from fewshot.service.memory import DecisionState
from fewshot.service.models import ModelSpec, default_model_name, service_recogniser
from fewshot.service.recogniser import Recogniser
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import ConflictError, NotFoundError, open_store

__all__ = ["LABELS_FILE", "MIN_OPSET", "MODEL_FILE", "PIXELS", "Standalone", "build_standalone",
           "export_stored_workspace", "export_workspace"]


def build_standalone(bundle: Bundle, state: DecisionState, *, model_name: str, workspace_id: str) -> Standalone:
    """The workspace's classifier: the bundle's embedder (its `model.onnx`) with the decision of
    `state` (`Recogniser.decision_state`) baked in."""
    if not state.protos.class_ids:
        raise ConflictError(f"workspace {workspace_id!r} has no classes yet; teach at least one class before exporting")
    p = state.protos
    taught = TaughtClasses(state.memory, p.labels, p.class_ids, workspace_id, p.version)
    probe = state.decision.uses_probe and state.memory.probe is not None
    return build_classifier(bundle, state.decision, taught, model_name=model_name,
                            head=service_head("probe" if probe else "prototype"))


def export_workspace(recogniser: Recogniser, bundle: Bundle, workspace_id: str, *, model_name: str) -> Standalone:
    """`build_standalone` of a workspace's current state in `recogniser` (which must run `bundle`)."""
    return build_standalone(bundle, recogniser.decision_state(workspace_id), model_name=model_name,
                            workspace_id=workspace_id)


def export_stored_workspace(db_url: str, workspace_id: str, bundles: Sequence[str], out_dir: str | Path) -> Path:
    """Write `model.onnx` + `labels.json` of a workspace read from the store at `db_url` to `out_dir`.

    bundles: the served bundle folders (or NAME=PATH); the one the workspace was created with is
    used, with the service-wide threshold overrides of the FEWSHOT_* variables, as `serve` applies them.
    """
    store = open_store(db_url)
    try:
        ws = store.get_workspace(workspace_id)
        if ws is None:
            raise NotFoundError(f"workspace {workspace_id!r} does not exist in store {store.safe_url}; list them there")
        for raw in bundles:
            spec = ModelSpec.parse(raw)
            if Manifest.read(spec.path).bundle_id == ws.bundle_id:
                break
        else:
            raise ConfigError(f"workspace {workspace_id!r} runs on bundle {ws.bundle_id}, which is none of {list(bundles)}; "
                              "pass the bundle folder the service serves it with")
        bundle = load_bundle(spec.path)
        settings = ServiceSettings.from_env(bundle_path=raw, db_url=db_url)
        recogniser = service_recogniser(bundle, store, settings)
        name = spec.name or default_model_name(bundle.manifest, spec.path)
        return export_workspace(recogniser, bundle, workspace_id, model_name=name).write(out_dir)
    finally:
        store.close()
