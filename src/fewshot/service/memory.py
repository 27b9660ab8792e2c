"""A workspace's class memory in this process: immutable snapshots (`Prototypes`: per class the sum
of its embeddings, of their squared norms, and the count), and `Memories`, which keeps one per
workspace in step with the store.

The store is the source of truth. A snapshot carries the workspace version it was read at; a call
first compares the store's version with it (one indexed read) and re-syncs only the classes whose
version changed, so several processes sharing a store see each other's classes. With a PostgreSQL
store that listens for changes (`store.feed`, `fewshot.service.notify`), that read is skipped while
the listener says the snapshot is current: it is connected, the snapshot was checked in the
listener's current epoch, and no newer version of the workspace is known.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from fewshot.decision import ClassMemory, ServedDecision
from fewshot.service.store import ConflictError, ExampleSet, NotFoundError, Store


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
class DecisionState:
    """A workspace's decision as `classify` makes it: the served decision and the class memory it
    reads (`memory`: the snapshot's, with the probe fitted for the "logistic" head), with the
    snapshot's class ids and labels (`protos`)."""

    decision: ServedDecision
    protos: Prototypes
    memory: ClassMemory


@dataclass
class WorkspaceMemory:
    protos: Prototypes
    checked_at: float
    lock: threading.Lock
    examples: ExampleSet | None = None  # cached for explain / logistic, valid at `examples_version`
    examples_version: int = -1
    probe: tuple[int, ClassMemory] | None = None  # the memory with its fitted probe, at a version
    epoch: int | None = None  # the store feed's epoch when `protos` was last checked (None: no feed)


def class_spans(class_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """class id -> (start, stop) of its run in `class_ids`, which is grouped by class."""
    spans: dict[str, tuple[int, int]] = {}
    start = 0
    for i in range(1, len(class_ids) + 1):
        if i == len(class_ids) or class_ids[i] != class_ids[start]:
            spans[class_ids[start]] = (start, i)
            start = i
    return spans


Change = Callable[[Prototypes], tuple[dict[str, Row], set[str]]]  # snapshot -> (new or changed rows, removed ids)


class Memories:
    """Every workspace's snapshot in this process, re-synced from `store` when its version moved.

    `check_first(workspace_id)` runs when a workspace is first seen (the recogniser refuses one of
    another model there); `sync_interval_s` > 0 trusts a snapshot that long without a read."""

    def __init__(self, store: Store, dim: int, *, sync_interval_s: float = 0.0,
                 check_first: Callable[[str], object] = lambda _: None) -> None:
        self.store, self.dim, self.sync_interval_s, self.check_first = store, dim, sync_interval_s, check_first
        self._mem: dict[str, WorkspaceMemory] = {}
        self._lock = threading.Lock()

    def get(self, workspace_id: str, version: int | None = None) -> WorkspaceMemory:
        """The workspace's memory, re-synced from the store when its version moved. `version`: the
        workspace's current version as the caller just read it (with its record, which the caller
        has checked): no read here unless the memory is older."""
        if version is not None:
            return self._caught_up(workspace_id, self._memory_of(workspace_id), version)
        mem = self._mem.get(workspace_id)
        feed = self.store.feed
        if mem is not None and feed is not None and feed.is_current(workspace_id, mem.protos.version, mem.epoch):
            return mem  # notified: no read
        now = time.monotonic()
        if mem is not None and now - mem.checked_at < self.sync_interval_s:
            return mem
        epoch = None if feed is None else feed.epoch()  # before the read: any later commit is notified to it
        version = self.store.workspace_version(workspace_id)
        if version is None:
            self.forget(workspace_id)
            raise_missing(workspace_id)
        if mem is None:
            self.check_first(workspace_id)
            mem = self._memory_of(workspace_id)
        self._caught_up(workspace_id, mem, version)
        mem.checked_at, mem.epoch = now, epoch
        return mem

    def _memory_of(self, workspace_id: str) -> WorkspaceMemory:
        with self._lock:
            return self._mem.setdefault(workspace_id, WorkspaceMemory(Prototypes.empty(), time.monotonic(),
                                                                      threading.Lock()))

    def _caught_up(self, workspace_id: str, mem: WorkspaceMemory, version: int) -> WorkspaceMemory:
        """`mem` synced to at least `version` (versions only grow: a newer snapshot is current too)."""
        if mem.protos.version < version:
            with mem.lock:
                if mem.protos.version < version:
                    mem.protos = self._sync(workspace_id, mem.protos)
        return mem

    def forget(self, workspace_id: str) -> None:
        with self._lock:
            self._mem.pop(workspace_id, None)

    def _sync(self, workspace_id: str, protos: Prototypes) -> Prototypes:
        """Fetch only classes that are new or whose version changed, drop deleted ones: one
        consistent read, so the snapshot's version always matches its rows."""
        known = {c: r.version for c, r in zip(protos.class_ids, protos.rows)}
        ch = self.store.changes(workspace_id, known)
        if ch is None:
            self.forget(workspace_id)
            raise_missing(workspace_id)
        spans = class_spans(ch.examples.class_ids)  # examples come ordered by class: one slice each
        rows: dict[str, Row] = {}
        for c in ch.changed:
            a, b = spans.get(c, (0, 0))
            e = ch.examples.embeddings[a:b] if b > a else np.zeros((0, self.dim), np.float32)
            if len(e) and e.shape[1] != self.dim:
                raise ConflictError(f"class {c!r} holds {e.shape[1]}-d embeddings; this model makes {self.dim}-d")
            label, version = ch.classes[c]
            rows[c] = Row.of(label, version, e) if len(e) else Row(label, version, np.zeros(self.dim), 0.0, 0)
        return protos.with_rows(ch.version, rows, set(protos.class_ids) - set(ch.classes))

    def apply_local(self, workspace_id: str, new_version: int, change: Change) -> None:
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

    def examples(self, workspace_id: str, mem: WorkspaceMemory) -> ExampleSet:
        """The workspace's stored examples, read once per version of `mem`'s snapshot."""
        if mem.examples is None or mem.examples_version != mem.protos.version:
            version = mem.protos.version
            mem.examples, mem.examples_version = self.store.examples(workspace_id), version
        return mem.examples


def raise_missing(workspace_id: str) -> NoReturn:
    raise NotFoundError(f"workspace {workspace_id!r} does not exist; create it with POST /workspaces")
