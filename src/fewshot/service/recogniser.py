"""The recogniser: per-workspace class memory over an embedder and a store (no HTTP here).

Each workspace (one knowledge domain) keeps its class memory (`fewshot.service.memory`: per class
the sum of its embeddings, of their squared norms, and the count) as an immutable snapshot, so
adding images to a class updates that row only. Classifying is the served decision
(`fewshot.decision.decide`): the bundle's `BundleDecision` with the workspace's metric, head and
threshold (`fewshot.service.workspace_settings`), on that memory (with the probe fitted on the
stored examples for the "logistic" head). A taught image is stored as the embedding the bundle's
example views give it (`fewshot.decision.example_embeddings`: the mean over its views, one row per
image; a bundle with views embeds that many images per taught image). Labels are checked by `fewshot.service.labels`; a
refused request raises a `fewshot.service.errors.RequestError` kind (no HTTP status here).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fewshot.artifacts.calibration import Calibration
from fewshot.artifacts.domain import DomainSummary, image_statistics
from fewshot.artifacts.embedders import Embedder
from fewshot.decision import (
    VIEW_COUNT,
    BundleDecision,
    ClassMemory,
    ServedDecision,
    decide,
    example_embeddings,
    fit_memory,
    prototype_scores,
)
from fewshot.service.answers import Explanation, Neighbour, Prediction, prediction_of
from fewshot.service.auth import hash_key, new_api_key
from fewshot.service.errors import RequestError, Unprocessable
from fewshot.service.images import array_thumbnail
from fewshot.service.labels import UNKNOWN, check_label, normalise_text
from fewshot.service.memory import Change, DecisionState, Memories, Prototypes, Row, WorkspaceMemory
from fewshot.service.store import (
    ClassRecord,
    ConflictError,
    ExampleSet,
    NewExample,
    NotFoundError,
    Store,
    WorkspaceRecord,
)
from fewshot.service.verdict import threshold_why
from fewshot.service.workspace_settings import WorkspaceSettings, check_threshold

__all__ = ["UNKNOWN", "DecisionState", "Explanation", "Prediction", "Recogniser", "RecogniserConfig",
           "WorkspaceSettings", "check_label", "check_threshold"]


@dataclass(frozen=True)
class RecogniserConfig:
    thumbnail_size: int = 64
    sync_interval_s: float = 0.0  # 0: check the store's version counter on every call (unless notified)
    max_logistic_classes: int = 2000  # the logistic head is refitted on change; bound its cost
    max_images_per_class: int = 1000



class Recogniser:
    """Teach classes from a few images and classify new ones, per workspace."""

    def __init__(self, embedder: Embedder, store: Store, *, decision: BundleDecision | None = None,
                 calibration: Calibration | None = None, config: RecogniserConfig | None = None,
                 domain: DomainSummary | None = None, bundle_id: str = "local") -> None:
        """decision: the bundle's served decision (default: nearest prototype, Euclidean, no
        open-set rule); calibration: how its open-set rules were calibrated (shown, not applied)."""
        self.embedder, self.store, self.calibration, self.domain = embedder, store, calibration, domain
        self.decision = decision or BundleDecision()
        self.bundle_id = bundle_id  # recorded with each workspace made here; others' are refused
        self.config = config or RecogniserConfig()
        self.dim = int(embedder.embedding_dim)
        self.memories = Memories(store, self.dim, sync_interval_s=self.config.sync_interval_s,
                                 check_first=self.workspace)

    @property
    def defaults(self) -> WorkspaceSettings:
        """The settings of a new workspace: the bundle's metric and head."""
        return WorkspaceSettings.from_rule(self.decision.rule)

    # -- workspaces ------------------------------------------------------------------------------
    def create_workspace(self, name: str, settings: WorkspaceSettings | None = None) -> tuple[WorkspaceRecord, str]:
        """A new isolated workspace and its API key (returned once; only its hash is stored)."""
        name = normalise_text(name, "workspace name")
        key = new_api_key()
        ws = self.store.create_workspace(name, hash_key(key), (settings or self.defaults).to_dict(), self.bundle_id)
        return ws, key

    def workspace(self, workspace_id: str) -> WorkspaceRecord:
        ws = self.store.get_workspace(workspace_id)
        if ws is None:
            raise NotFoundError(f"workspace {workspace_id!r} does not exist; create it with POST /workspaces")
        self._check_model(ws)
        return ws

    def _check_model(self, ws: WorkspaceRecord) -> None:
        """Refuse a workspace of another model: its embeddings are not comparable with ours."""
        if ws.bundle_id != self.bundle_id:
            raise ConflictError(f"workspace {ws.id!r} holds embeddings of model bundle {ws.bundle_id}, not "
                                f"{self.bundle_id}; use the recogniser of its model")

    def settings(self, workspace_id: str) -> WorkspaceSettings:
        return WorkspaceSettings.from_dict(self.workspace(workspace_id).settings)

    def update_settings(self, workspace_id: str, settings: WorkspaceSettings) -> WorkspaceRecord:
        return self.store.update_workspace_settings(workspace_id, settings.to_dict())

    def patch_settings(self, workspace_id: str, given: dict[str, Any], *, clear_threshold: bool = False) -> WorkspaceRecord:
        """Change some settings atomically. A threshold is on one metric's novelty scale: changing the
        metric without giving a threshold clears it (back to the bundle's calibrated one)."""

        def merge(current: dict[str, Any]) -> dict[str, Any]:
            cur = WorkspaceSettings.from_dict(current)
            d = {**cur.to_dict(), **given}
            if clear_threshold or (d["metric"] != cur.metric and "threshold" not in given):
                d["threshold"] = None
            if d["metric"] != cur.metric or d["head"] != cur.head:
                d["adapted"] = None  # the measurement that chose the head no longer describes it
            return WorkspaceSettings.from_dict(d).to_dict()

        return self.store.merge_workspace_settings(workspace_id, merge)

    def delete_workspace(self, workspace_id: str) -> None:
        self.store.delete_workspace(workspace_id)
        self.memories.forget(workspace_id)

    # -- class memory ------------------------------------------------------------------------------
    def _memory(self, workspace_id: str) -> WorkspaceMemory:
        return self.memories.get(workspace_id)

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        """The embedder's (N, D) embeddings, refused (422) when any is not finite: a NaN stored in a
        class would turn every answer of the workspace into NaN (a bring-your-own model may give NaN
        or infinity for some inputs)."""
        return self._finite(self.embedder.embed(images_u8))

    @property
    def views_per_image(self) -> int:
        """Forward passes per taught image: the bundle's example views (`fewshot.decision.views`)."""
        return VIEW_COUNT[self.decision.rule.views]

    @staticmethod
    def _finite(emb: np.ndarray) -> np.ndarray:
        """`emb` (one row per uploaded image), refused (422) when any row is not finite."""
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if len(bad):
            raise Unprocessable(f"the model embeds {len(bad)} of {len(emb)} image(s) (first: "
                              f"number {int(bad[0]) + 1}) to NaN or infinity, so they can be neither taught nor "
                              "classified; send other images, or fix the model's preprocessing", "non_finite_embedding")
        return emb

    def _embed_examples(self, images_u8: np.ndarray, thumbnails: Sequence[bytes] | None) -> tuple[np.ndarray, list[bytes]]:
        n = len(images_u8)
        if n == 0:
            raise RequestError("no images given; a class needs at least 1 image")
        if n > self.config.max_images_per_class:
            raise RequestError(f"{n} images exceed the limit of {self.config.max_images_per_class} per class")
        if thumbnails is not None and len(thumbnails) != n:
            raise RequestError(f"{len(thumbnails)} thumbnails for {n} images; pass one per image or None")
        rule = self.decision.rule  # the bundle's example views (fewshot.decision.views): views x images embedded
        emb = self._finite(example_embeddings(self.embedder.embed, images_u8, rule.views, rule.view_shift))
        thumbs = list(thumbnails) if thumbnails is not None else [
            array_thumbnail(a, self.config.thumbnail_size) for a in images_u8]
        return emb, thumbs

    def add_class(self, workspace_id: str, label: str, images_u8: np.ndarray,
                  thumbnails: Sequence[bytes] | None = None) -> ClassRecord:
        """A new class from 1..K images (uint8 (K, C, H, W)); one store transaction."""
        label = check_label(label)
        self._memory(workspace_id)  # loaded first, so our own change can be applied locally
        emb, thumbs = self._embed_examples(images_u8, thumbnails)
        rec, _ = self.store.add_class(workspace_id, label, [NewExample(e, t) for e, t in zip(emb, thumbs)])
        self.memories.apply_local(workspace_id, rec.version, lambda p: ({rec.id: Row.of(rec.label, rec.version, emb)}, set()))
        return rec

    def add_images(self, workspace_id: str, class_id: str, images_u8: np.ndarray,
                   thumbnails: Sequence[bytes] | None = None) -> ClassRecord:
        """More images for a class: only that class's prototype row is updated."""
        self._memory(workspace_id)
        emb, thumbs = self._embed_examples(images_u8, thumbnails)
        rec, _ = self.store.add_examples(workspace_id, class_id, [NewExample(e, t) for e, t in zip(emb, thumbs)],
                                         max_per_class=self.config.max_images_per_class)

        def change(p: Prototypes) -> tuple[dict[str, Row], set[str]]:
            old = p.rows[p.index[class_id]]
            return {class_id: old.plus(rec.label, rec.version, emb)}, set()

        self._apply_local_if_known(workspace_id, class_id, rec.version, change)
        return rec

    def _apply_local_if_known(self, workspace_id: str, class_id: str, version: int, change: Change) -> None:
        self.memories.apply_local(workspace_id, version, lambda p: change(p) if class_id in p.index else ({}, set()))

    def rename_class(self, workspace_id: str, class_id: str, label: str) -> ClassRecord:
        rec = self.store.rename_class(workspace_id, class_id, check_label(label))

        def change(p: Prototypes) -> tuple[dict[str, Row], set[str]]:
            return {class_id: replace(p.rows[p.index[class_id]], label=rec.label, version=rec.version)}, set()

        self._apply_local_if_known(workspace_id, class_id, rec.version, change)
        return rec

    def delete_class(self, workspace_id: str, class_id: str) -> None:
        version = self.store.delete_class(workspace_id, class_id)
        self.memories.apply_local(workspace_id, version, lambda p: ({}, {class_id}))  # else the next call re-syncs

    def list_classes(self, workspace_id: str) -> list[ClassRecord]:
        self.workspace(workspace_id)
        return self.store.list_classes(workspace_id)

    def get_class(self, workspace_id: str, class_id: str) -> tuple[ClassRecord, list[str]]:
        """The class and its example ids."""
        return self.store.get_class(workspace_id, class_id), self.store.class_example_ids(workspace_id, class_id)

    def class_count(self, workspace_id: str) -> int:
        return len(self._memory(workspace_id).protos.class_ids)

    def decision_state(self, workspace_id: str, threshold: float | None = None, *,
                       current: WorkspaceRecord | None = None) -> DecisionState:
        """Everything `classify` decides with, for one consistent class memory (for export).
        current: the workspace as the caller just read it (`fewshot.service.views`): its settings and
        version are used as they are, with no store read unless the class memory is older."""
        if current is None:
            record, version = self.workspace(workspace_id), None  # the memory reads the version itself
        else:
            self._check_model(current)
            record, version = current, current.version
        decision = WorkspaceSettings.from_dict(record.settings).served(self.decision, threshold)
        mem = self.memories.get(workspace_id, version)
        with mem.lock:
            protos = mem.protos
            return DecisionState(decision, protos, self._class_memory(workspace_id, mem, decision))

    def threshold_why(self, workspace_id: str, *, current: WorkspaceRecord | None = None) -> dict[str, Any] | None:
        """The unknown threshold of the workspace's current version and why (`fewshot.service.verdict`)."""
        record = self.workspace(workspace_id) if current is None else current
        decision = WorkspaceSettings.from_dict(record.settings).served(self.decision)
        return threshold_why(decision, self.memories.get(workspace_id, record.version).protos.counts,
                             self.calibrated_threshold(decision))

    def calibrated_threshold(self, decision: ServedDecision) -> float | None:
        """The bundle's own threshold for the decision's metric (None: not calibrated for it)."""
        rule = self.decision.open_set.get(decision.metric)
        return None if rule is None else rule.threshold

    def stored_examples(self, workspace_id: str) -> ExampleSet:
        """The workspace's stored examples (ids, class ids, embeddings), read once per version."""
        return self.memories.examples(workspace_id, self._memory(workspace_id))

    # -- classification ------------------------------------------------------------------------------
    def _class_memory(self, workspace_id: str, mem: WorkspaceMemory, decision: ServedDecision) -> ClassMemory:
        """The snapshot's memory; for a probe head with 2+ classes, with the probe fitted on the
        stored examples of the snapshot's classes (the decision's C and max_iter; once per version)."""
        p = mem.protos
        if not decision.uses_probe or len(p.class_ids) < 2:
            return p.memory
        if mem.probe is not None and mem.probe[0] == p.version:
            return mem.probe[1]
        if len(p.class_ids) > self.config.max_logistic_classes:
            raise RequestError(f"the logistic head is limited to {self.config.max_logistic_classes} classes "
                              f"(workspace has {len(p.class_ids)}); use head='prototype'")
        ex = self.memories.examples(workspace_id, mem)
        keep = np.asarray([c in p.index for c in ex.class_ids], bool)  # a class added since is not in `p`
        y = np.asarray([p.index[c] for c in ex.class_ids if c in p.index], np.int64)
        probe = fit_memory(decision, ex.embeddings[keep], y, len(p.class_ids)).probe
        memory = replace(p.memory, probe=probe)
        mem.probe = (p.version, memory)
        return memory

    def classify(self, workspace_id: str, images_u8: np.ndarray, *, top_k: int = 5, threshold: float | None = None,
                 previews: Sequence[np.ndarray] | None = None,
                 current: WorkspaceRecord | None = None) -> list[Prediction]:
        """Top-k classes with probabilities for each image; "unknown" when the open-set rule rejects
        the answered class (threshold: call override > workspace setting > bundle calibration > none).
        previews: each upload as a small RGB array (`fewshot.artifacts.domain.small_rgb`); with the
        bundle's domain summary, images far outside the training domain are flagged. current: as in
        `decision_state`."""
        state = self.decision_state(workspace_id, threshold, current=current)
        p = state.protos
        if not p.class_ids:
            raise ConflictError(f"workspace {workspace_id!r} has no classes yet; add a class before classifying")
        if top_k < 1:
            raise RequestError(f"top_k {top_k} must be >= 1")
        q = self.embed(images_u8)
        answer = decide(state.decision, state.memory, q)
        calibrated = self.calibrated_threshold(state.decision)
        preds = [prediction_of(p, answer, i, state.decision, top_k, calibrated) for i in range(len(q))]
        return self._flag_out_of_domain(preds, q, previews)

    def _flag_out_of_domain(self, preds: list[Prediction], q: np.ndarray,
                            previews: Sequence[np.ndarray] | None) -> list[Prediction]:
        if self.domain is None:
            return preds
        stats = None if previews is None else [image_statistics(pv) for pv in previews]
        verdicts = self.domain.check(q, stats)
        return [replace(p, out_of_domain=v.out_of_domain, domain_score=v.score, domain_reasons=v.reasons)
                for p, v in zip(preds, verdicts)]

    def explain(self, workspace_id: str, image_u8: np.ndarray, *, k: int = 3, threshold: float | None = None,
                preview: np.ndarray | None = None, current: WorkspaceRecord | None = None) -> Explanation:
        """The prediction for one image (C, H, W) and its `k` nearest stored examples."""
        pred = self.classify(workspace_id, image_u8[None], top_k=k, threshold=threshold,
                             previews=None if preview is None else [preview], current=current)[0]
        mem = self.memories.get(workspace_id, None if current is None else current.version)
        protos = mem.protos
        ex = self.memories.examples(workspace_id, mem)
        known = [i for i, c in enumerate(ex.class_ids) if c in protos.index]  # classes of this snapshot only
        if not known:
            return Explanation(pred, [])
        emb = ex.embeddings[known]
        q = self.embed(image_u8[None])
        s = prototype_scores(q, emb, pred.metric, (emb * emb).sum(1))[0]
        order = [known[j] for j in np.argsort(s if pred.metric == "euclidean" else -s, kind="stable")[:k]]
        score = dict(zip(known, s.tolist()))
        thumbs = self.store.thumbnails(workspace_id, [ex.ids[i] for i in order])
        return Explanation(pred, [Neighbour(ex.ids[i], ex.class_ids[i], protos.labels[protos.index[ex.class_ids[i]]],
                                            float(score[i]), thumbs[ex.ids[i]]) for i in order
                                  if ex.ids[i] in thumbs])  # an example deleted meanwhile is left out

    def thumbnail(self, workspace_id: str, example_id: str) -> bytes:
        t = self.store.thumbnails(workspace_id, [example_id])
        if example_id not in t:
            raise NotFoundError(f"example {example_id!r} does not exist in workspace {workspace_id!r}")
        return t[example_id]

    def iter_workspaces(self) -> Iterator[WorkspaceRecord]:
        yield from self.store.list_workspaces()

