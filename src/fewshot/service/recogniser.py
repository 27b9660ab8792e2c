"""The recogniser: per-workspace class memory over an embedder and a store (no HTTP here).

Each workspace (one knowledge domain) keeps its class memory (`fewshot.decision.ClassMemory`: per
class the sum of its embeddings, of their squared norms, and the count) as an immutable snapshot,
so adding images to a class updates that row only. Classifying is the served decision
(`fewshot.decision.decide`): the bundle's `BundleDecision` with the workspace's metric, head and
threshold, on that memory (with the probe fitted on the stored examples for the "logistic" head). The store is the source of truth: a call
first compares the workspace's version counter with the snapshot's (one indexed read) and re-syncs
only the classes whose version changed, so several processes sharing a store see each other's
classes. With a PostgreSQL store that listens for changes (`store.feed`, `fewshot.service.notify`),
that read is skipped while the listener says the snapshot is current: it is connected, the snapshot
was checked in the listener's current epoch, and no newer version of the workspace is known.
"""

from __future__ import annotations

import math
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NoReturn

import numpy as np

from fewshot.artifacts.calibration import Calibration
from fewshot.artifacts.domain import DomainSummary, image_statistics
from fewshot.artifacts.embedders import Embedder
from fewshot.decision import (
    METRICS,
    Answer,
    BundleDecision,
    ClassMemory,
    DecisionRule,
    Metric,
    ServedDecision,
    decide,
    fit_memory,
)
from fewshot.errors import ConfigError
from fewshot.service.auth import hash_key, new_api_key
from fewshot.service.heads import (
    SERVICE_HEADS,
    ServiceHead,
    head_of,
    prototype_scores,
    service_head,
)
from fewshot.service.images import UploadError, array_thumbnail
from fewshot.service.store import (
    ClassRecord,
    ConflictError,
    ExampleSet,
    NewExample,
    NotFoundError,
    Store,
    WorkspaceRecord,
)

UNKNOWN = "unknown"


@dataclass(frozen=True)
class WorkspaceSettings:
    """Per-workspace decision rule; `threshold` overrides the bundle's calibrated one."""

    metric: Metric = "euclidean"
    head: ServiceHead = "prototype"
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_rule(cls, rule: DecisionRule) -> WorkspaceSettings:
        """The settings that apply a bundle's decision rule (a probe is the "logistic" head)."""
        return cls(metric=rule.metric, head=service_head(rule.rule))

    def served(self, bundle: BundleDecision, threshold: float | None = None) -> ServedDecision:
        """The decision this workspace serves: the bundle's, with its metric, head and threshold
        (`threshold`: a per-call override, checked)."""
        t = check_threshold(threshold) if threshold is not None else self.threshold
        return bundle.served(self.metric, head_of(self.head), t)

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: WorkspaceSettings | None = None) -> WorkspaceSettings:
        unknown = set(d) - {"metric", "head", "threshold"}
        if unknown:
            raise ConfigError(f"unknown workspace settings {sorted(unknown)}; valid: metric, head, threshold")
        base = defaults or cls()
        metric, head = d.get("metric", base.metric), d.get("head", base.head)
        if metric not in METRICS:
            raise ConfigError(f"metric {metric!r} is not supported; use one of {list(METRICS)}")
        if head not in SERVICE_HEADS:
            raise ConfigError(f"head {head!r} is not supported; use 'prototype' or 'logistic'")
        t = d.get("threshold")
        return cls(metric=metric, head=head, threshold=None if t is None else check_threshold(t))


def check_threshold(t: object) -> float:
    """A finite number >= 0 (nan, +-inf and negative values would silently reject or accept everything)."""
    try:
        f = float(t) if not isinstance(t, bool) and isinstance(t, int | float | np.floating) else math.nan
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ConfigError(f"threshold {str(t)[:40]!r} must be a finite number; omit it to use the calibrated one")
    if f < 0:
        raise ConfigError(f"threshold {f:g} is below 0: novelty is never negative, so every answer would be "
                          "'unknown'; give a threshold >= 0 (larger accepts more), or omit it to use the calibrated one")
    return f


@dataclass(frozen=True)
class RecogniserConfig:
    thumbnail_size: int = 64
    sync_interval_s: float = 0.0  # 0: check the store's version counter on every call (unless notified)
    max_logistic_classes: int = 2000  # the logistic head is refitted on change; bound its cost
    max_images_per_class: int = 1000


@dataclass(frozen=True)
class Row:
    """One class in memory: what its prototype and spread are computed from."""

    label: str
    version: int
    total: np.ndarray  # (D,) float64 sum of example embeddings
    sq_total: float  # sum of the examples' squared norms
    count: int

    @classmethod
    def of(cls, label: str, version: int, emb: np.ndarray) -> Row:
        e = emb.astype(np.float64)
        return cls(label, version, e.sum(0), float((e * e).sum()), len(e))

    def plus(self, label: str, version: int, emb: np.ndarray) -> Row:
        more = Row.of(label, version, emb)
        return Row(label, version, self.total + more.total, self.sq_total + more.sq_total, self.count + more.count)


@dataclass(frozen=True)
class Prototypes:
    """Immutable snapshot of one workspace's class memory; replaced, never mutated."""

    version: int
    class_ids: tuple[str, ...]
    rows: tuple[Row, ...]
    memory: ClassMemory  # what the decision reads (no probe: it is fitted on demand)
    index: dict[str, int] = field(repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(r.label for r in self.rows)

    @property
    def means(self) -> np.ndarray:
        """(K, D) float32 prototypes."""
        return self.memory.means

    @property
    def counts(self) -> np.ndarray:
        return self.memory.counts

    @classmethod
    def build(cls, version: int, rows: dict[str, Row]) -> Prototypes:
        ids, rs = tuple(rows), tuple(rows.values())
        dim = rs[0].total.shape[0] if rs else 0
        memory = ClassMemory(np.asarray([r.total for r in rs], np.float64).reshape(len(rs), dim),
                             np.asarray([r.sq_total for r in rs], np.float64),
                             np.asarray([r.count for r in rs], np.int64))
        return cls(version, ids, rs, memory, {c: i for i, c in enumerate(ids)})

    @classmethod
    def empty(cls, version: int = -1) -> Prototypes:
        return cls.build(version, {})

    def as_dict(self) -> dict[str, Row]:
        return dict(zip(self.class_ids, self.rows))

    def with_rows(self, version: int, rows: dict[str, Row], removed: Iterable[str] = ()) -> Prototypes:
        """Replace or append rows; drop `removed` (order: kept classes first, then new ones)."""
        current = self.as_dict()
        for c in removed:
            current.pop(c, None)
        current.update(rows)
        return Prototypes.build(version, current)


@dataclass(frozen=True)
class Candidate:
    class_id: str
    label: str
    probability: float
    score: float  # squared distance (euclidean) or cosine similarity to the class prototype


@dataclass(frozen=True)
class Prediction:
    label: str  # a class label, or "unknown"
    class_id: str | None
    known: bool
    probability: float
    score: float  # the answered class's score (squared distance or cosine similarity to its prototype)
    novelty: float | None  # the open-set rule's novelty of the query for the answered class
    threshold: float | None  # accepted when novelty <= threshold; None: no rule, always accepted
    metric: Metric
    top_k: list[Candidate]
    rule: str | None = None  # the open-set rule's kind ("spread", "global")
    out_of_domain: bool = False  # far outside the images the model was trained on (still classified)
    domain_score: float | None = None  # > 1: out of domain; None: the bundle has no domain summary
    domain_reasons: tuple[str, ...] = ()  # for end users, e.g. "a colour image sent to a model trained on ..."


@dataclass(frozen=True)
class Neighbour:
    example_id: str
    class_id: str
    label: str
    score: float
    thumbnail_png: bytes


@dataclass(frozen=True)
class Explanation:
    prediction: Prediction
    neighbours: list[Neighbour]


@dataclass(frozen=True)
class DecisionState:
    """A workspace's decision as `classify` makes it: the served decision and the class memory it
    reads (`memory`: the snapshot's, with the probe fitted for the "logistic" head), with the
    snapshot's class ids and labels (`protos`)."""

    decision: ServedDecision
    protos: Prototypes
    memory: ClassMemory


@dataclass
class _Memory:
    protos: Prototypes
    checked_at: float
    lock: threading.Lock
    examples: ExampleSet | None = None  # cached for explain / logistic, valid at `examples_version`
    examples_version: int = -1
    probe: tuple[int, ClassMemory] | None = None  # the memory with its fitted probe, at a version
    epoch: int | None = None  # the store feed's epoch when `protos` was last checked (None: no feed)


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
        self._mem: dict[str, _Memory] = {}
        self._mem_lock = threading.Lock()

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
            return WorkspaceSettings.from_dict(d).to_dict()

        return self.store.merge_workspace_settings(workspace_id, merge)

    def delete_workspace(self, workspace_id: str) -> None:
        self.store.delete_workspace(workspace_id)
        with self._mem_lock:
            self._mem.pop(workspace_id, None)

    # -- class memory ------------------------------------------------------------------------------
    def _memory(self, workspace_id: str) -> _Memory:
        """The workspace's memory, re-synced from the store when its version moved."""
        mem = self._mem.get(workspace_id)
        feed = self.store.feed
        if mem is not None and feed is not None and feed.is_current(workspace_id, mem.protos.version, mem.epoch):
            return mem  # notified: no read
        now = time.monotonic()
        if mem is not None and now - mem.checked_at < self.config.sync_interval_s:
            return mem
        epoch = None if feed is None else feed.epoch()  # before the read: any later commit is notified to it
        version = self.store.workspace_version(workspace_id)
        if version is None:
            self._forget(workspace_id)
        if mem is None:
            self.workspace(workspace_id)  # first sight: the workspace must be of this model
            with self._mem_lock:
                mem = self._mem.setdefault(workspace_id, _Memory(Prototypes.empty(), now, threading.Lock()))
        if mem.protos.version != version:
            with mem.lock:
                if mem.protos.version != version:
                    mem.protos = self._sync(workspace_id, mem.protos)
        mem.checked_at, mem.epoch = now, epoch
        return mem

    def _forget(self, workspace_id: str) -> NoReturn:
        with self._mem_lock:
            self._mem.pop(workspace_id, None)
        raise NotFoundError(f"workspace {workspace_id!r} does not exist; create it with POST /workspaces")

    def _sync(self, workspace_id: str, protos: Prototypes) -> Prototypes:
        """Fetch only classes that are new or whose version changed, drop deleted ones: one
        consistent read, so the snapshot's version always matches its rows."""
        known = {c: r.version for c, r in zip(protos.class_ids, protos.rows)}
        ch = self.store.changes(workspace_id, known)
        if ch is None:
            self._forget(workspace_id)
        spans = _class_spans(ch.examples.class_ids)  # examples come ordered by class: one slice each
        rows: dict[str, Row] = {}
        for c in ch.changed:
            a, b = spans.get(c, (0, 0))
            e = ch.examples.embeddings[a:b] if b > a else np.zeros((0, self.dim), np.float32)
            if len(e) and e.shape[1] != self.dim:
                raise ConflictError(f"class {c!r} holds {e.shape[1]}-d embeddings; this model makes {self.dim}-d")
            label, version = ch.classes[c]
            rows[c] = Row.of(label, version, e) if len(e) else Row(label, version, np.zeros(self.dim), 0.0, 0)
        return protos.with_rows(ch.version, rows, set(protos.class_ids) - set(ch.classes))

    def _apply_local(self, workspace_id: str, new_version: int,
                     change: Callable[[Prototypes], tuple[dict[str, Row], set[str]]]) -> None:
        """Apply our own committed change (version `new_version`) without a store round trip, if
        the memory holds exactly the state before it. `change` computes the new rows from the
        memory *under its lock*, so two writers never apply stale copies over each other; any
        other case is left to the next call's re-sync."""
        mem = self._mem.get(workspace_id)
        if mem is None:
            return
        with mem.lock:
            if mem.protos.version == new_version - 1:
                rows, removed = change(mem.protos)
                mem.protos = mem.protos.with_rows(new_version, rows, removed)

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        """The embedder's (N, D) embeddings, refused (422) when any is not finite: a NaN stored in a
        class would turn every answer of the workspace into NaN (a bring-your-own model may give NaN
        or infinity for some inputs)."""
        emb = self.embedder.embed(images_u8)
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if len(bad):
            raise UploadError(422, "non_finite_embedding", f"the model embeds {len(bad)} of {len(emb)} image(s) (first: "
                              f"number {int(bad[0]) + 1}) to NaN or infinity, so they can be neither taught nor "
                              "classified; send other images, or fix the model's preprocessing")
        return emb

    def _embed_examples(self, images_u8: np.ndarray, thumbnails: Sequence[bytes] | None) -> tuple[np.ndarray, list[bytes]]:
        n = len(images_u8)
        if n == 0:
            raise ConfigError("no images given; a class needs at least 1 image")
        if n > self.config.max_images_per_class:
            raise ConfigError(f"{n} images exceed the limit of {self.config.max_images_per_class} per class")
        if thumbnails is not None and len(thumbnails) != n:
            raise ConfigError(f"{len(thumbnails)} thumbnails for {n} images; pass one per image or None")
        emb = self.embed(images_u8)
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
        self._apply_local(workspace_id, rec.version, lambda p: ({rec.id: Row.of(rec.label, rec.version, emb)}, set()))
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

    def _apply_local_if_known(self, workspace_id: str, class_id: str, version: int,
                              change: Callable[[Prototypes], tuple[dict[str, Row], set[str]]]) -> None:
        self._apply_local(workspace_id, version, lambda p: change(p) if class_id in p.index else ({}, set()))

    def rename_class(self, workspace_id: str, class_id: str, label: str) -> ClassRecord:
        rec = self.store.rename_class(workspace_id, class_id, check_label(label))

        def change(p: Prototypes) -> tuple[dict[str, Row], set[str]]:
            return {class_id: replace(p.rows[p.index[class_id]], label=rec.label, version=rec.version)}, set()

        self._apply_local_if_known(workspace_id, class_id, rec.version, change)
        return rec

    def delete_class(self, workspace_id: str, class_id: str) -> None:
        version = self.store.delete_class(workspace_id, class_id)
        self._apply_local(workspace_id, version, lambda p: ({}, {class_id}))  # else the next call re-syncs

    def list_classes(self, workspace_id: str) -> list[ClassRecord]:
        self.workspace(workspace_id)
        return self.store.list_classes(workspace_id)

    def get_class(self, workspace_id: str, class_id: str) -> tuple[ClassRecord, list[str]]:
        """The class and its example ids."""
        return self.store.get_class(workspace_id, class_id), self.store.class_example_ids(workspace_id, class_id)

    def class_count(self, workspace_id: str) -> int:
        return len(self._memory(workspace_id).protos.class_ids)

    def decision_state(self, workspace_id: str, threshold: float | None = None) -> DecisionState:
        """Everything `classify` decides with, for one consistent class memory (for export)."""
        decision = self.settings(workspace_id).served(self.decision, threshold)
        mem = self._memory(workspace_id)
        with mem.lock:
            protos = mem.protos
            return DecisionState(decision, protos, self._class_memory(workspace_id, mem, decision))

    def stored_examples(self, workspace_id: str) -> ExampleSet:
        """The workspace's stored examples (ids, class ids, embeddings), read once per version."""
        return self._examples(workspace_id, self._memory(workspace_id))

    # -- classification ------------------------------------------------------------------------------
    def _examples(self, workspace_id: str, mem: _Memory) -> ExampleSet:
        if mem.examples is None or mem.examples_version != mem.protos.version:
            version = mem.protos.version
            mem.examples, mem.examples_version = self.store.examples(workspace_id), version
        return mem.examples

    def _class_memory(self, workspace_id: str, mem: _Memory, decision: ServedDecision) -> ClassMemory:
        """The snapshot's memory; for a probe head with 2+ classes, with the probe fitted on the
        stored examples of the snapshot's classes (the decision's C and max_iter; once per version)."""
        p = mem.protos
        if not decision.uses_probe or len(p.class_ids) < 2:
            return p.memory
        if mem.probe is not None and mem.probe[0] == p.version:
            return mem.probe[1]
        if len(p.class_ids) > self.config.max_logistic_classes:
            raise ConfigError(f"the logistic head is limited to {self.config.max_logistic_classes} classes "
                              f"(workspace has {len(p.class_ids)}); use head='prototype'")
        ex = self._examples(workspace_id, mem)
        keep = np.asarray([c in p.index for c in ex.class_ids], bool)  # a class added since is not in `p`
        y = np.asarray([p.index[c] for c in ex.class_ids if c in p.index], np.int64)
        probe = fit_memory(decision, ex.embeddings[keep], y, len(p.class_ids)).probe
        memory = replace(p.memory, probe=probe)
        mem.probe = (p.version, memory)
        return memory

    def classify(self, workspace_id: str, images_u8: np.ndarray, *, top_k: int = 5,
                 threshold: float | None = None, previews: Sequence[np.ndarray] | None = None) -> list[Prediction]:
        """Top-k classes with probabilities for each image; "unknown" when the open-set rule rejects
        the answered class (threshold: call override > workspace setting > bundle calibration > none).
        previews: each upload as a small RGB array (`fewshot.artifacts.domain.small_rgb`); with the
        bundle's domain summary, images far outside the training domain are flagged."""
        state = self.decision_state(workspace_id, threshold)
        p = state.protos
        if not p.class_ids:
            raise ConflictError(f"workspace {workspace_id!r} has no classes yet; add a class before classifying")
        if top_k < 1:
            raise ConfigError(f"top_k {top_k} must be >= 1")
        q = self.embed(images_u8)
        answer = decide(state.decision, state.memory, q)
        preds = [_prediction(p, answer, i, state.decision, top_k) for i in range(len(q))]
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
                preview: np.ndarray | None = None) -> Explanation:
        """The prediction for one image (C, H, W) and its `k` nearest stored examples."""
        pred = self.classify(workspace_id, image_u8[None], top_k=k, threshold=threshold,
                             previews=None if preview is None else [preview])[0]
        mem = self._memory(workspace_id)
        protos = mem.protos
        ex = self._examples(workspace_id, mem)
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


def _prediction(p: Prototypes, a: Answer, i: int, decision: ServedDecision, top_k: int) -> Prediction:
    """Query i of `a` as the service answers it."""
    cands = [Candidate(p.class_ids[j], p.labels[j], float(a.probabilities[i, j]), float(a.scores[i, j]))
             for j in a.top(i, min(top_k, len(p.class_ids)))]
    label, known, rule = int(a.label[i]), bool(a.known[i]), decision.open_set
    return Prediction(p.labels[label] if known else UNKNOWN, p.class_ids[label] if known else None, known,
                      float(a.probabilities[i, label]), float(a.score[i]),
                      None if a.novelty is None else float(a.novelty[i]), decision.threshold, decision.metric, cands,
                      None if rule is None else rule.kind)


MAX_LABEL_CHARS = 200


def _class_spans(class_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """class id -> (start, stop) of its run in `class_ids`, which is grouped by class."""
    spans: dict[str, tuple[int, int]] = {}
    start = 0
    for i in range(1, len(class_ids) + 1):
        if i == len(class_ids) or class_ids[i] != class_ids[start]:
            spans[class_ids[start]] = (start, i)
            start = i
    return spans


# Characters that render as nothing or as blank space but are letters or symbols to Unicode (so
# neither strip() nor the control/format categories catch them): Hangul fillers, the blank Braille
# pattern, the combining grapheme joiner, Khmer inherent vowels, Mongolian and other variation
# selectors, the object replacement character.
_BLANK_LOOKING = frozenset([0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x034F, 0x17B4, 0x17B5, 0xFFFC,
                            *range(0x180B, 0x1810), *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)])
# Letters that look like those of "unknown" (a small skeleton map in the spirit of Unicode's
# confusables.txt; fullwidth and mathematical forms are already folded by NFKC).
_LOOKALIKE = str.maketrans({
    "\u043e": "o", "\u03bf": "o", "\u1d0f": "o", "\u2c9f": "o", "\u0585": "o", "\u1040": "o", "0": "o",
    "\u043a": "k", "\u03ba": "k", "\u1d0b": "k", "\u0138": "k", "\u049d": "k",
    "\u0578": "n", "\u057c": "n", "\u0274": "n", "\u03bd": "n", "\u043f": "n", "\u03b7": "n",
    "\u03c9": "w", "\u0461": "w", "\u051d": "w", "\u1d21": "w", "\u026f": "w",
    "\u03c5": "u", "\u057d": "u", "\u1d1c": "u", "\u03bc": "u", "\u028b": "u",
})


def _skeleton(text: str) -> str:
    """What `text` looks like: compatibility forms folded, marks dropped, case folded, look-alike
    letters mapped to the Latin ones."""
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(ch for ch in decomposed if not unicodedata.category(ch).startswith("M"))
    return bare.casefold().translate(_LOOKALIKE)


def normalise_text(value: object, what: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """Unicode NFC, trimmed; refuses empty, over-long, control, invisible, blank-looking and
    line-separator text, and text that starts with a combining mark (naming the fix)."""
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be text, got {type(value).__name__}")
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise ConfigError(f"{what} is empty; give 1 to {max_chars} characters")
    if len(text) > max_chars:
        raise ConfigError(f"{what} has {len(text):,} characters; give at most {max_chars}")
    shown = text[:40]
    if "\ufffd" in text:
        raise ConfigError(f"{what} {shown!r} contains U+FFFD, the mark of text that was not valid UTF-8; send "
                          "the text as UTF-8")
    bad = sorted({f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")})
    if bad:  # control, format (zero-width, bidi overrides), surrogate, private-use, unassigned
        raise ConfigError(f"{what} {shown!r} contains control or invisible characters ({', '.join(bad[:5])}); "
                          "remove them")
    seps = sorted({f"U+{ord(ch):04X}" for ch in text if unicodedata.category(ch) in ("Zl", "Zp")})
    if seps:
        raise ConfigError(f"{what} {shown!r} contains line or paragraph separators ({', '.join(seps)}); "
                          "give one line of text")
    blank = sorted({f"U+{ord(ch):04X}" for ch in text if ord(ch) in _BLANK_LOOKING})
    if blank:
        raise ConfigError(f"{what} {shown!r} contains characters that look blank ({', '.join(blank[:5])}); "
                          "use visible characters")
    lone = [i for i, ch in enumerate(text) if unicodedata.category(ch).startswith("M")
            and (i == 0 or text[i - 1].isspace())]
    if lone:
        ch = text[lone[0]]
        raise ConfigError(f"{what} {shown!r} has a combining mark (U+{ord(ch):04X}) with no letter before it, at "
                          f"character {lone[0] + 1}; put it after the letter it belongs to, or remove it")
    return text


def check_label(label: object) -> str:
    """A class label as stored: NFC, trimmed, not the reserved word "unknown" in any letter case,
    compatibility form or look-alike letters (Cyrillic o, Greek omicron, ...)."""
    text = normalise_text(label, "class label")
    if _skeleton(text) == UNKNOWN:
        same = unicodedata.normalize("NFKC", text).casefold() == UNKNOWN
        raise ConfigError(f"class label {text!r} " + ("is" if same else "looks like the word 'unknown', which is")
                          + " reserved for rejected images; choose another label")
    return text
