"""The models one service serves: each bundle under a name ("characters", "photos"), one recogniser
per model over the shared store. A workspace chooses its model at creation; the store records the
model's bundle id with it, and every operation of the workspace runs on that model, so embeddings
of different models never meet.

Names say which bundle is served: a zoo entry's name (`zoo:NAME`, or the `bundle` folder of an
entry), else the bundle's manifest (`source.name`: the run it was exported from), else its folder
name; `NAME=PATH` on the command line renames. The web page names the model by it (e.g. in the
out-of-domain warning). The first model is the default (for `POST /workspaces` without `model`, and
`GET /model`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fewshot.artifacts.bundle import Bundle, Manifest, load_bundle
from fewshot.artifacts.calibration import Calibration
from fewshot.artifacts.zoo import BUNDLE_DIR, CARD, resolve_bundle
from fewshot.decision import BundleDecision, Metric
from fewshot.errors import ConfigError
from fewshot.service.recogniser import Recogniser, RecogniserConfig
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import ConflictError, ModelIdentity, Store, WorkspaceRecord

MODEL_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


class UnknownModelError(ConfigError):
    """A workspace asked for a model the service does not serve."""


@dataclass(frozen=True)
class ModelSpec:
    """One `serve` argument: a bundle folder and the name to serve it under (None: from the bundle)."""

    path: Path
    name: str | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """`PATH`, `zoo:NAME` or `NAME=PATH` / `NAME=zoo:ENTRY`; a path that exists as written is never
        split at its '='."""
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            return cls(resolve_bundle(spec))
        return cls(resolve_bundle(path), check_model_name(name, where=f"model spec {spec!r}"))


def check_model_name(name: str, *, where: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"{where}: model name {name[:80]!r} must be 1-64 lower-case letters, digits, '_', '.' or "
                          "'-' starting with a letter or digit; rename it with NAME=PATH, e.g. photos=bundles/photos")
    return name


def zoo_entry_name(bundle: Path) -> str | None:
    """The name of the zoo entry whose bundle folder `bundle` is (`zoo/NAME/bundle`), else None."""
    entry = bundle.resolve().parent
    if bundle.resolve().name == BUNDLE_DIR and (entry / CARD).is_file() and MODEL_NAME.fullmatch(entry.name):
        return entry.name
    return None


def default_model_name(manifest: Manifest, path: Path) -> str:
    """The zoo entry's name when `path` is a zoo bundle (a zoo model trained as `quickstart` is served
    as its entry, not as `quickstart`), else the manifest's `source.name` when it is a valid model
    name, else the bundle folder's name."""
    for candidate in (zoo_entry_name(path) or "", str(manifest.source.get("name", "")), path.resolve().name.lower()):
        if MODEL_NAME.fullmatch(candidate):
            return candidate
    return check_model_name(path.name, where=f"bundle {path}")


@dataclass(frozen=True)
class ServedModel:
    name: str
    bundle: Bundle
    recogniser: Recogniser

    @property
    def bundle_id(self) -> str:
        return self.bundle.bundle_id

    def describe(self, *, default: bool) -> dict[str, Any]:
        """What a client may know of the model (no file paths)."""
        m = self.bundle.manifest
        pre = self.bundle.preprocessing
        trained = m.source.get("trained_here", "learner" in m.source)
        return {"name": self.name, "default": default, "bundle_id": m.bundle_id, "mode": pre.mode, "size": pre.size,
                "embedding_dim": m.embedding_dim, "backbone": m.backbone.get("name"), "trained": bool(trained),
                "calibrated": self.recogniser.calibration is not None,
                "trained_on": None if m.domain is None else m.domain.get("trained_on")}


class ModelSet:
    """The served models, by name and by bundle id; the first is the default."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ConfigError("no models to serve; pass one or more bundle folders")
        self.models = tuple(models)
        self._by_name: dict[str, ServedModel] = {}
        self._by_bundle: dict[str, ServedModel] = {}
        for m in self.models:
            if m.name in self._by_name:
                raise ConfigError(f"two bundles are named {m.name!r}; give one another name with NAME=PATH, "
                                  f"e.g. {m.name}2=PATH")
            if m.bundle_id in self._by_bundle:
                raise ConfigError(f"models {self._by_bundle[m.bundle_id].name!r} and {m.name!r} are the same bundle "
                                  f"{m.bundle_id}; serve each bundle once")
            self._by_name[m.name], self._by_bundle[m.bundle_id] = m, m

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str | None) -> ServedModel:
        """The model called `name` (None: the default), or UnknownModelError naming the choices."""
        if name is None:
            return self.default
        model = self._by_name.get(name)
        if model is None:
            raise UnknownModelError(f"model {name[:80]!r} is not served here; choose one of {self.names} (GET /models "
                                    "lists them), or start the service with that bundle too")
        return model

    def of_workspace(self, ws: WorkspaceRecord) -> ServedModel:
        model = self._by_bundle.get(ws.bundle_id)
        if model is None:  # created by another service process sharing the store with other models
            raise ConflictError(f"workspace {ws.id!r} uses model bundle {ws.bundle_id}, which this service does not "
                                f"serve (it serves {self.names}); start the service with that bundle too")
        return model

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe(default=i == 0) for i, m in enumerate(self.models)]


def service_decision(bundle: Bundle, s: ServiceSettings) -> tuple[BundleDecision, Calibration | None]:
    """The bundle's decision with the service-level threshold overrides applied to its open-set
    rules (on their novelty scale), and its calibration as GET /model shows it (the rules served)."""
    given: tuple[tuple[Metric, float | None], ...] = (("euclidean", s.euclidean_threshold),
                                                       ("cosine", s.cosine_threshold))
    overrides = {m: t for m, t in given if t is not None}
    decision, calibration = bundle.decision, bundle.calibration
    if not overrides:
        return decision, calibration
    decision = decision.with_thresholds(overrides)
    return decision, replace(calibration or Calibration(0, 0, 0, 0), rules=dict(decision.open_set))


def service_recogniser(bundle: Bundle, store: Store, settings: ServiceSettings,
                       config: RecogniserConfig | None = None) -> Recogniser:
    """The recogniser of `bundle` over `store`, deciding as `settings` says (`service_decision`)."""
    decision, calibration = service_decision(bundle, settings)
    return Recogniser(bundle.onnx_embedder, store, decision=decision, calibration=calibration, config=config,
                      domain=bundle.domain, bundle_id=bundle.bundle_id)


def load_models(settings: ServiceSettings, store: Store) -> ModelSet:
    """Load every bundle of `settings.model_specs`, one recogniser each over `store`; refuse (before
    serving anything) a store holding workspaces of a model that is not among them."""
    config = RecogniserConfig(thumbnail_size=settings.thumbnail_size, sync_interval_s=settings.sync_interval_s)
    served = []
    for raw in settings.model_specs:
        spec = ModelSpec.parse(raw)
        bundle = load_bundle(spec.path, intra_op_threads=settings.ort_threads or None)
        recogniser = service_recogniser(bundle, store, settings, config)
        served.append(ServedModel(spec.name or default_model_name(bundle.manifest, spec.path), bundle, recogniser))
    models = ModelSet(served)
    store.check_models([(ModelIdentity(m.bundle.embedding_dim, m.bundle_id), m.name) for m in models.models])
    return models
