"""Export a taught workspace as one standalone ONNX classifier plus a labels file.

The classifier is the bundle's ONNX embedder composed (`onnx.compose.merge_models`) with a small
preprocessing graph in front and the ONNX form of the workspace's served decision behind
(`fewshot.decision.onnx_form`, built from the same `ServedDecision` and class memory that
`Recogniser.classify` passes to `fewshot.decision.decide`):

    pixels uint8 (N, C, S, S) -> x / 255 [-> (x - mean) / std] -> embedder -> embeddings (N, D)
    scores (N, K)         squared distances ("euclidean") or cosine similarities to the K prototypes
    probabilities (N, K)  softmax of the head's logits (prototype: -d^2 or scale * cos; logistic: the fitted probe)
    novelty (N,)          float64, the open-set rule's novelty of the answered class
    label_index (N,)      int64, index into labels.json's `labels`; -1 = "unknown" (novelty > threshold)

It runs on ONNX Runtime alone. The embedder is the model the service runs (`Bundle.onnx_path`:
`model.int8.onnx` in an int8 bundle), its names prefixed with `embedder/` so that no name of a
bring-your-own model collides with the graphs around it. The added graphs use only operators whose
form is the same from opset 12 on, so a bundle whose model is of opset 12 or newer exports.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from fewshot.artifacts.bundle import Bundle, Manifest, load_bundle
from fewshot.artifacts.embedders import ONNX_INPUT, ONNX_OUTPUT
from fewshot.data.imageio import Preprocessing
from fewshot.decision.onnx_form import (
    LABEL_INDEX,
    NOVELTY,
    PROBS,
    SCORES,
    UNKNOWN_INDEX,
    decision_graph,
)
from fewshot.errors import ConfigError
from fewshot.service.heads import service_head
from fewshot.service.models import ModelSpec, default_model_name, service_recogniser
from fewshot.service.recogniser import DecisionState, Recogniser
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import ConflictError, NotFoundError, open_store

FORMAT = "fewshot-standalone-1"
PIXELS = "pixels"
MODEL_FILE, LABELS_FILE = "model.onnx", "labels.json"
EMBEDDER_PREFIX = "embedder/"
MIN_OPSET = 12  # LessOrEqual; the other added operators keep their form from opset 11 on


@dataclass(frozen=True)
class Standalone:
    """The exported classifier: the ONNX model and the labels file's contents."""
    model: onnx.ModelProto
    labels: dict[str, Any]

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.model, str(out / MODEL_FILE))
        (out / LABELS_FILE).write_text(json.dumps(self.labels, indent=2, ensure_ascii=False))
        return out

    def zip_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(MODEL_FILE, self.model.SerializeToString())
            z.writestr(LABELS_FILE, json.dumps(self.labels, indent=2, ensure_ascii=False))
        return buf.getvalue()


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _like(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    """`graph` as a model with the bundle model's IR version and opsets (merge_models needs them equal)."""
    return helper.make_model(graph, ir_version=model.ir_version, opset_imports=list(model.opset_import))


def _input_graph(pre: Preprocessing) -> onnx.GraphProto:
    """uint8 pixels -> the embedder's float input, as `fewshot.data.imageio.model_input` computes it."""
    nodes = [_const("pre_scale", np.asarray(1.0 / 255.0, np.float32)),
             helper.make_node("Cast", [PIXELS], ["pre_float"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["pre_float", "pre_scale"], ["pre_x" if pre.mean is not None else ONNX_INPUT])]
    if pre.mean is not None and pre.std is not None:
        per_channel = (1, pre.channels, 1, 1)
        nodes += [_const("pre_mean", np.asarray(pre.mean, np.float32).reshape(per_channel)),
                  _const("pre_std", np.asarray(pre.std, np.float32).reshape(per_channel)),
                  helper.make_node("Sub", ["pre_x", "pre_mean"], ["pre_centred"]),
                  helper.make_node("Div", ["pre_centred", "pre_std"], [ONNX_INPUT])]
    shape: list[str | int] = ["N", pre.channels, pre.size, pre.size]
    return helper.make_graph(nodes, "preprocess", [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, shape)],
                             [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, shape)])


def _labels_file(state: DecisionState, bundle: Bundle, model_name: str, workspace_id: str) -> dict[str, Any]:
    pre = bundle.preprocessing
    d = state.decision
    rule = d.open_set
    probe = d.uses_probe and state.memory.probe is not None
    return {
        "format": FORMAT, "labels": list(state.protos.labels), "class_ids": list(state.protos.class_ids),
        "workspace": {"id": workspace_id, "version": state.protos.version},
        "model": {"name": model_name, "bundle_id": bundle.bundle_id},
        "input": {"name": PIXELS, "dtype": "uint8", "shape": ["N", pre.channels, pre.size, pre.size], "layout": "NCHW",
                  "how": "decode to `mode`, resize to round(size / crop) square with `resample`, keep the centre "
                         "size x size; the model divides by 255 and applies mean/std itself"},
        "preprocessing": {"mode": pre.mode, "size": pre.size, "resample": pre.resample, "crop": pre.crop,
                          "mean": None if pre.mean is None else list(pre.mean),
                          "std": None if pre.std is None else list(pre.std)},
        "decision": {"metric": d.metric, "head": service_head("probe" if probe else "prototype"),
                     "rule": None if rule is None else rule.to_dict(), "threshold": d.threshold,
                     "cosine_scale": d.rule.cosine_scale},
        "outputs": {SCORES: "(N, K) float32: squared distance (euclidean) or cosine similarity to each class",
                    PROBS: "(N, K) float32: class probabilities; columns in `labels` order",
                    NOVELTY: "(N,) float64: how unlike its nearest class the image is; known when <= threshold",
                    LABEL_INDEX: f"(N,) int64: index into `labels`, {UNKNOWN_INDEX} = unknown"},
    }


def _served_embedder(bundle: Bundle) -> onnx.ModelProto:
    """The ONNX model the service runs for `bundle`, refused when its opset predates `MIN_OPSET`."""
    model = onnx.load_model(str(bundle.onnx_path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ConfigError(f"bundle {bundle.bundle_id}'s model {bundle.served_model} uses ONNX opset {opset}; the "
                          f"standalone export needs opset >= {MIN_OPSET}: re-export the model with a newer opset "
                          "(e.g. torch.onnx.export(..., opset_version=17)) and rebuild the bundle")
    return model


def build_standalone(bundle: Bundle, state: DecisionState, *, model_name: str, workspace_id: str) -> Standalone:
    """The workspace's classifier: the bundle's embedder (its `model.onnx`) with the decision of
    `state` (`Recogniser.decision_state`) baked in."""
    if not state.protos.class_ids:
        raise ConflictError(f"workspace {workspace_id!r} has no classes yet; teach at least one class before exporting")
    embedder = _served_embedder(bundle)
    pre = _like(embedder, _input_graph(bundle.preprocessing))
    head = _like(embedder, decision_graph(state.decision, state.memory, bundle.embedding_dim, src=ONNX_OUTPUT))
    embedder = compose.add_prefix(embedder, EMBEDDER_PREFIX)
    model = compose.merge_models(pre, embedder, io_map=[(ONNX_INPUT, EMBEDDER_PREFIX + ONNX_INPUT)])
    model = compose.merge_models(model, head, io_map=[(EMBEDDER_PREFIX + ONNX_OUTPUT, ONNX_OUTPUT)])
    model.producer_name = "fewshot standalone export"
    onnx.checker.check_model(model)
    return Standalone(model, _labels_file(state, bundle, model_name, workspace_id))


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
