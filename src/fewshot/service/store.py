"""Persistent class memory: workspaces, hashed API keys, classes, examples and the model identity.

The store is the source of truth; the recogniser keeps prototypes in memory and re-syncs a
workspace when its `version` (bumped in the same transaction as every change) moves. Every change
is one transaction, so a crash or exception mid-registration leaves no half class.

Backends: `SQLiteStore` (default; WAL, one connection per thread) and `PostgresStore`
(psycopg 3 through psycopg_pool: connections checked on checkout, reconnected with a short backoff).
Both run the same SQL, written with `?` placeholders. PostgreSQL also sends each committed change
to the other processes sharing the database (`pg_notify` in the change's transaction), and with
`notifications=True` listens for theirs (`fewshot.service.notify`), so replicas need not read a
workspace's version on every call.

Failures: an unreachable or failing database (PostgreSQL down or restarting, SQLite disk full or
read-only) raises `StoreUnavailable`, whose message never holds the URL or credentials; a dropped
connection is retried once, except at COMMIT, where the outcome is unknown and a retry could apply
a change twice. Text containing NUL is refused as `InvalidInput` on both backends (PostgreSQL
cannot store it; SQLite could, so the two behave the same).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fewshot.errors import FewshotError
from fewshot.io import redact_url
from fewshot.service.notify import CHANNEL, PgListener, Tally, VersionFeed, payload

SCHEMA_VERSION = 2  # 2: each workspace records its model (workspaces.bundle_id, table models)
RETRY_AFTER_S = 2  # what a 503 tells clients while the store is down
log = logging.getLogger("fewshot.service.store")
F = TypeVar("F")


class StoreError(FewshotError):
    """The store cannot do what was asked."""


class NotFoundError(StoreError):
    """A workspace, class or example does not exist (in this workspace)."""


class ConflictError(StoreError):
    """A change conflicts with what is stored (e.g. a duplicate class label)."""


class InvalidInput(StoreError):
    """A value the store cannot hold (e.g. text with a NUL character)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or cannot write right now: a server fault (HTTP 503).
    The message is safe to show to clients: no URL, user or password."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelMismatchError(StoreError):
    """The store was filled by a different model; its embeddings are meaningless to this one."""


@dataclass(frozen=True)
class ModelIdentity:
    embedding_dim: int
    bundle_id: str


@dataclass(frozen=True)
class WorkspaceRecord:
    id: str
    name: str
    key_hash: str
    settings: dict[str, Any]
    version: int
    bundle_id: str = ""  # the model whose embeddings the workspace holds (fixed at creation)


@dataclass(frozen=True)
class ClassRecord:
    id: str
    label: str
    version: int
    n_examples: int


@dataclass(frozen=True)
class NewExample:
    """embedding: float32 (D,); thumbnail_png: a small PNG shown when explaining predictions."""

    embedding: np.ndarray
    thumbnail_png: bytes


@dataclass(frozen=True)
class ExampleSet:
    """All examples of some classes: ids (E,), class_ids (E,), embeddings float32 (E, D)."""

    ids: list[str]
    class_ids: list[str]
    embeddings: np.ndarray


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


_ID = re.compile(r"(ws|cls|ex)_[0-9a-f]{16}")


def is_id(value: str, prefix: str) -> bool:
    """Whether `value` has the shape of an id made by `new_id(prefix)` (checked before any query)."""
    m = _ID.fullmatch(value)
    return m is not None and m.group(1) == prefix


def scrub_secrets(text: str, url: str) -> str:
    """`text` (a driver's error message) with the password of `url` replaced by ***, as written and
    percent-decoded, and the URL itself redacted."""
    from urllib.parse import unquote

    _, sep, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0] if sep else ""
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
    found += re.findall(r"(?i)password=([^&#\s]+)", url)
    text = text.replace(url, redact_url(url))
    for secret in sorted({v for p in found for v in (p, unquote(p)) if p}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _check_params(params: Sequence[Any]) -> None:
    for p in params:
        if isinstance(p, str) and "\x00" in p:
            raise InvalidInput(f"text {p[:40]!r} contains a NUL character (\\x00); remove control characters")


class _CommitUnknown(Exception):
    """The connection failed during COMMIT: the change may or may not be stored."""


def _guarded(method: F) -> F:
    """Map backend failures to StoreUnavailable; retry once after a dropped connection."""

    @functools.wraps(method)  # type: ignore[arg-type]
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        for attempt in (1, 2):
            try:
                return method(self, *args, **kwargs)  # type: ignore[operator]
            except StoreError:
                raise
            except _CommitUnknown as exc:
                log.warning("store %s: connection lost during COMMIT (%s)", self.safe_url,
                            scrub_secrets(str(exc.__cause__), self.url))
                raise StoreUnavailable("the database connection was lost while saving; the change may not "
                                       "have been applied: check before retrying", retry_after_s=0) from exc
            except Exception as exc:
                kind = self._failure_kind(exc)
                if kind is None:
                    raise
                if kind == "connection" and attempt == 1:
                    log.warning("store %s: %s; retrying once", self.safe_url, type(exc).__name__)
                    continue
                log.error("store %s unavailable: %s: %s", self.safe_url, type(exc).__name__,
                          scrub_secrets(str(exc), self.url))
                raise StoreUnavailable(self._unavailable_message(exc)) from exc
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


def _schema(blob: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS workspaces (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
        "key_hash TEXT NOT NULL UNIQUE, settings TEXT NOT NULL, version BIGINT NOT NULL, "
        "created_unix DOUBLE PRECISION NOT NULL, bundle_id TEXT)",
        "CREATE TABLE IF NOT EXISTS models (bundle_id TEXT PRIMARY KEY, embedding_dim BIGINT NOT NULL, "
        "name TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS classes (id TEXT PRIMARY KEY, "
        "workspace_id TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE, label TEXT NOT NULL, "
        "version BIGINT NOT NULL, created_unix DOUBLE PRECISION NOT NULL, UNIQUE (workspace_id, label))",
        "CREATE TABLE IF NOT EXISTS examples (id TEXT PRIMARY KEY, "
        "class_id TEXT NOT NULL REFERENCES classes(id) ON DELETE CASCADE, workspace_id TEXT NOT NULL, "
        f"embedding {blob} NOT NULL, thumbnail {blob} NOT NULL, created_unix DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX IF NOT EXISTS examples_class ON examples (class_id)",
        "CREATE INDEX IF NOT EXISTS examples_workspace ON examples (workspace_id)",
    ]


class Store(ABC):
    """Backend-neutral operations; subclasses supply connections, transactions and dialect."""

    url: str
    feed: VersionFeed | None = None  # PostgreSQL with notifications: the versions this process knows of
    version_reads: Tally  # calls of `workspace_version` (the per-call change check)

    # -- backend hooks ---------------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction; yields an object with `.execute(sql, params)` -> cursor."""

    @abstractmethod
    def _connect(self) -> Any:
        """A new connection (each thread gets its own, see `_conn`)."""

    @abstractmethod
    def _is_unique_violation(self, exc: BaseException) -> bool: ...

    @abstractmethod
    @contextmanager
    def _snapshot(self) -> Iterator[Any]:
        """A read-only transaction: every read inside sees the same committed state."""

    def _changed(self, c: Any, workspace_id: str, version: int | None) -> None:
        """Inside a change's transaction: the workspace reached `version` (None: deleted).
        Nothing for SQLite (one process); PostgreSQL tells the other processes."""
        return None

    def _observe(self, workspace_id: str, version: int) -> None:
        """The store is (at least) at `version` of the workspace: committed by us, or just read."""
        if self.feed is not None:
            self.feed.observe(workspace_id, version)

    def _failure_kind(self, exc: BaseException) -> str | None:
        """"connection" (retry once), "unavailable" (503 now) or None (a bug: let it raise)."""
        return None

    def _unavailable_message(self, exc: BaseException) -> str:
        return "the database is unavailable; retry shortly"

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    # -- connections (SQLite: one per thread; PostgreSQL overrides with a pool) ------------------
    def _init_connections(self) -> None:
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(conn, "closed", False):
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A connection for one read statement."""
        yield self._conn()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def _sql(self, sql: str) -> str:
        return sql

    def _exec(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        _check_params(params)
        return conn.execute(self._sql(sql), tuple(params))

    # -- model identity ----------------------------------------------------------------------
    @abstractmethod
    def _columns(self, c: Any, table: str) -> set[str]:
        """The column names of `table`."""

    def _migrate(self, c: Any) -> None:
        """Schema 1 -> 2: stores of one model gain `workspaces.bundle_id`; their workspaces are
        assigned the one bundle recorded in `meta` (the bundle that filled them)."""
        if "bundle_id" not in self._columns(c, "workspaces"):
            self._exec(c, "ALTER TABLE workspaces ADD COLUMN bundle_id TEXT")
        meta = dict(self._exec(c, "SELECT key, value FROM meta").fetchall())
        if "bundle_id" in meta:
            self._exec(c, "INSERT INTO models (bundle_id, embedding_dim, name) SELECT ?, ?, '' WHERE NOT EXISTS "
                       "(SELECT 1 FROM models WHERE bundle_id = ?)",
                       (meta["bundle_id"], int(meta["embedding_dim"]), meta["bundle_id"]))
            self._exec(c, "UPDATE workspaces SET bundle_id = ? WHERE bundle_id IS NULL", (meta["bundle_id"],))

    def check_model(self, model: ModelIdentity) -> None:
        """`check_models` of a service serving one model."""
        self.check_models([(model, "")])

    @_guarded
    def check_models(self, models: Sequence[tuple[ModelIdentity, str]]) -> None:
        """Record the served models ((identity, name), the first is the default); refuse a store
        holding workspaces of a model that is not among them (their embeddings are meaningless to
        the others)."""
        with self._tx() as c:
            meta = dict(self._exec(c, "SELECT key, value FROM meta").fetchall())
            if "embedding_dim" not in meta:  # the first model to fill the store (read by schema-1 code)
                first = models[0][0]
                for k, v in (("schema_version", SCHEMA_VERSION), ("embedding_dim", first.embedding_dim),
                             ("bundle_id", first.bundle_id)):
                    self._exec(c, "INSERT INTO meta (key, value) VALUES (?, ?)", (k, str(v)))
            self._exec(c, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            stored = {r[0]: int(r[1]) for r in self._exec(c, "SELECT bundle_id, embedding_dim FROM models").fetchall()}
            for m, name in models:
                if m.bundle_id in stored:
                    self._exec(c, "UPDATE models SET name = ? WHERE bundle_id = ?", (name, m.bundle_id))
                else:
                    self._exec(c, "INSERT INTO models (bundle_id, embedding_dim, name) VALUES (?, ?, ?)",
                               (m.bundle_id, m.embedding_dim, name))
            used = self._exec(c, "SELECT bundle_id, COUNT(*) FROM workspaces GROUP BY bundle_id").fetchall()
        served = {m.bundle_id for m, _ in models}
        missing = {(r[0] or "none"): int(r[1]) for r in used if r[0] not in served}
        if missing:
            raise ModelMismatchError(self._missing_models_message(missing, stored, models))

    def _missing_models_message(self, missing: dict[str, int], stored: dict[str, int],
                                models: Sequence[tuple[ModelIdentity, str]]) -> str:
        held = ", ".join(f"{n} workspace(s) of bundle {b} ({stored.get(b, '?')}-d embeddings)" for b, n in missing.items())
        serving = ", ".join(f"{m.bundle_id} ({m.embedding_dim}-d)" for m, _ in models)
        return (f"store {self.safe_url} holds {held}, but this service serves only {serving}: embeddings of different "
                "models are not comparable; serve that bundle too (fewshot serve BUNDLE [BUNDLE ...]) or use a new "
                "database")

    @_guarded
    def model_identity(self) -> ModelIdentity | None:
        """The first model recorded in the store (schema 1's one model)."""
        with self._read() as c:
            rows = dict(self._exec(c, "SELECT key, value FROM meta").fetchall())
        if "embedding_dim" not in rows:
            return None
        return ModelIdentity(int(rows["embedding_dim"]), rows["bundle_id"])

    # -- workspaces ----------------------------------------------------------------------------
    @_guarded
    def create_workspace(self, name: str, key_hash: str, settings: dict[str, Any], bundle_id: str) -> WorkspaceRecord:
        """A new workspace holding embeddings of model `bundle_id` (fixed for its life)."""
        if not bundle_id:
            raise InvalidInput("a workspace needs the bundle id of its model; pass the served bundle's id")
        ws = WorkspaceRecord(new_id("ws"), name, key_hash, dict(settings), 0, bundle_id)
        with self._tx() as c:
            self._exec(c, "INSERT INTO workspaces (id, name, key_hash, settings, version, created_unix, bundle_id) "
                       "VALUES (?, ?, ?, ?, 0, ?, ?)",
                       (ws.id, name, key_hash, json.dumps(settings), time.time(), bundle_id))
        return ws

    _WS_SELECT = "SELECT id, name, key_hash, settings, version, bundle_id FROM workspaces"

    def _ws_row(self, c: Any, where: str, value: str) -> WorkspaceRecord | None:
        row = self._exec(c, f"{self._WS_SELECT} WHERE {where} = ?", (value,)).fetchone()
        return None if row is None else WorkspaceRecord(row[0], row[1], row[2], json.loads(row[3]), int(row[4]), row[5] or "")

    @_guarded
    def get_workspace(self, workspace_id: str) -> WorkspaceRecord | None:
        with self._read() as c:
            ws = self._ws_row(c, "id", workspace_id)
        if ws is not None:
            self._observe(ws.id, ws.version)
        return ws

    @_guarded
    def workspace_by_key_hash(self, key_hash: str) -> WorkspaceRecord | None:
        with self._read() as c:
            ws = self._ws_row(c, "key_hash", key_hash)
        if ws is not None:
            self._observe(ws.id, ws.version)
        return ws

    @_guarded
    def list_workspaces(self) -> list[WorkspaceRecord]:
        with self._read() as c:
            rows = self._exec(c, f"{self._WS_SELECT} ORDER BY created_unix").fetchall()
        return [WorkspaceRecord(r[0], r[1], r[2], json.loads(r[3]), int(r[4]), r[5] or "") for r in rows]

    @_guarded
    def workspace_version(self, workspace_id: str) -> int | None:
        """The cheap change check: one indexed row read."""
        self.version_reads.inc()
        with self._read() as c:
            row = self._exec(c, "SELECT version FROM workspaces WHERE id = ?", (workspace_id,)).fetchone()
        return None if row is None else int(row[0])

    def _bump(self, c: Any, workspace_id: str) -> int:
        """The workspace's next version, in the change's transaction (and its notification)."""
        row = self._exec(c, "UPDATE workspaces SET version = version + 1 WHERE id = ? RETURNING version",
                         (workspace_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"workspace {workspace_id!r} does not exist; create it with POST /workspaces")
        self._changed(c, workspace_id, int(row[0]))
        return int(row[0])

    @_guarded
    def update_workspace_settings(self, workspace_id: str, settings: dict[str, Any]) -> WorkspaceRecord:
        with self._tx() as c:
            self._bump(c, workspace_id)
            self._exec(c, "UPDATE workspaces SET settings = ? WHERE id = ?", (json.dumps(settings), workspace_id))
            ws = self._ws_row(c, "id", workspace_id)
        assert ws is not None
        self._observe(ws.id, ws.version)
        return ws

    @_guarded
    def merge_workspace_settings(self, workspace_id: str,
                                 merge: Callable[[dict[str, Any]], dict[str, Any]]) -> WorkspaceRecord:
        """Read-modify-write of a workspace's settings in one transaction (the version bump locks
        the row first), so concurrent partial updates never overwrite each other."""
        with self._tx() as c:
            self._bump(c, workspace_id)
            row = self._exec(c, "SELECT settings FROM workspaces WHERE id = ?", (workspace_id,)).fetchone()
            self._exec(c, "UPDATE workspaces SET settings = ? WHERE id = ?",
                       (json.dumps(merge(json.loads(row[0]))), workspace_id))
            ws = self._ws_row(c, "id", workspace_id)
        assert ws is not None
        self._observe(ws.id, ws.version)
        return ws

    @_guarded
    def delete_workspace(self, workspace_id: str) -> None:
        with self._tx() as c:
            self._exec(c, "DELETE FROM examples WHERE workspace_id = ?", (workspace_id,))
            self._exec(c, "DELETE FROM classes WHERE workspace_id = ?", (workspace_id,))
            if self._exec(c, "DELETE FROM workspaces WHERE id = ?", (workspace_id,)).rowcount == 0:
                raise NotFoundError(f"workspace {workspace_id!r} does not exist")
            self._changed(c, workspace_id, None)

    # -- classes and examples ----------------------------------------------------------------------
    def _insert_examples(self, c: Any, workspace_id: str, class_id: str, examples: Sequence[NewExample]) -> list[str]:
        ids = []
        for ex in examples:
            eid = new_id("ex")
            emb = np.ascontiguousarray(ex.embedding, dtype=np.float32).tobytes()
            self._exec(c, "INSERT INTO examples (id, class_id, workspace_id, embedding, thumbnail, created_unix) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (eid, class_id, workspace_id, emb, ex.thumbnail_png, time.time()))
            ids.append(eid)
        if not ids:
            raise StoreError("a class needs at least one image; upload 1 or more")
        return ids

    @_guarded
    def add_class(self, workspace_id: str, label: str, examples: Iterable[NewExample]) -> tuple[ClassRecord, list[str]]:
        """Create a class with its examples in one transaction; returns it and the example ids."""
        examples = list(examples)  # a retry after a dropped connection needs them again
        cid = new_id("cls")
        try:
            with self._tx() as c:
                v = self._bump(c, workspace_id)
                self._exec(c, "INSERT INTO classes (id, workspace_id, label, version, created_unix) "
                           "VALUES (?, ?, ?, ?, ?)", (cid, workspace_id, label, v, time.time()))
                ids = self._insert_examples(c, workspace_id, cid, examples)
        except Exception as exc:
            if self._is_unique_violation(exc):
                raise ConflictError(f"class label {label!r} already exists in workspace {workspace_id!r}; "
                                    "add images to it or choose another label") from exc
            raise
        self._observe(workspace_id, v)
        return ClassRecord(cid, label, v, len(ids)), ids

    @_guarded
    def add_examples(self, workspace_id: str, class_id: str, examples: Iterable[NewExample], *,
                     max_per_class: int | None = None) -> tuple[ClassRecord, list[str]]:
        """More examples for a class; refused (ConflictError) past `max_per_class` stored examples."""
        examples = list(examples)
        with self._tx() as c:
            v = self._bump(c, workspace_id)
            self._require_class(c, workspace_id, class_id)
            if max_per_class is not None:
                n = int(self._exec(c, "SELECT COUNT(*) FROM examples WHERE class_id = ?", (class_id,)).fetchone()[0])
                if n + len(examples) > max_per_class:
                    raise ConflictError(f"class {class_id!r} holds {n} images; {len(examples)} more would exceed the "
                                        f"limit of {max_per_class} per class")
            self._exec(c, "UPDATE classes SET version = ? WHERE id = ?", (v, class_id))
            ids = self._insert_examples(c, workspace_id, class_id, examples)
            rec = self._class_row(c, workspace_id, class_id)
        self._observe(workspace_id, v)
        return rec, ids

    def _require_class(self, c: Any, workspace_id: str, class_id: str) -> None:
        row = self._exec(c, "SELECT 1 FROM classes WHERE id = ? AND workspace_id = ?", (class_id, workspace_id)).fetchone()
        if row is None:
            raise NotFoundError(f"class {class_id!r} does not exist in workspace {workspace_id!r}; list classes first")

    @_guarded
    def rename_class(self, workspace_id: str, class_id: str, label: str) -> ClassRecord:
        try:
            with self._tx() as c:
                v = self._bump(c, workspace_id)
                self._require_class(c, workspace_id, class_id)
                self._exec(c, "UPDATE classes SET label = ?, version = ? WHERE id = ?", (label, v, class_id))
                rec = self._class_row(c, workspace_id, class_id)
        except Exception as exc:
            if self._is_unique_violation(exc):
                raise ConflictError(f"class label {label!r} already exists in workspace {workspace_id!r}; "
                                    "choose another label") from exc
            raise
        self._observe(workspace_id, v)
        return rec

    @_guarded
    def delete_class(self, workspace_id: str, class_id: str) -> int:
        """Delete a class and its examples; returns the workspace's new version."""
        with self._tx() as c:
            v = self._bump(c, workspace_id)
            self._require_class(c, workspace_id, class_id)
            self._exec(c, "DELETE FROM examples WHERE class_id = ?", (class_id,))
            self._exec(c, "DELETE FROM classes WHERE id = ?", (class_id,))
        self._observe(workspace_id, v)
        return v

    _CLASS_SELECT = ("SELECT c.id, c.label, c.version, COUNT(e.id) FROM classes c "
                     "LEFT JOIN examples e ON e.class_id = c.id WHERE c.workspace_id = ? ")

    @_guarded
    def list_classes(self, workspace_id: str) -> list[ClassRecord]:
        with self._read() as c:
            rows = self._exec(c, self._CLASS_SELECT + "GROUP BY c.id, c.label, c.version, c.created_unix "
                              "ORDER BY c.created_unix, c.id", (workspace_id,)).fetchall()
        return [ClassRecord(r[0], r[1], int(r[2]), int(r[3])) for r in rows]

    def _class_versions(self, c: Any, workspace_id: str) -> dict[str, tuple[str, int]]:
        rows = self._exec(c, "SELECT id, label, version FROM classes WHERE workspace_id = ?", (workspace_id,)).fetchall()
        return {r[0]: (r[1], int(r[2])) for r in rows}

    @_guarded
    def class_versions(self, workspace_id: str) -> dict[str, tuple[str, int]]:
        """class id -> (label, version): what a sync compares against its cache."""
        with self._read() as c:
            return self._class_versions(c, workspace_id)

    def _class_row(self, c: Any, workspace_id: str, class_id: str) -> ClassRecord:
        row = self._exec(c, self._CLASS_SELECT + "AND c.id = ? GROUP BY c.id, c.label, c.version",
                         (workspace_id, class_id)).fetchone()
        if row is None:
            raise NotFoundError(f"class {class_id!r} does not exist in workspace {workspace_id!r}; list classes first")
        return ClassRecord(row[0], row[1], int(row[2]), int(row[3]))

    @_guarded
    def get_class(self, workspace_id: str, class_id: str) -> ClassRecord:
        with self._read() as c:
            return self._class_row(c, workspace_id, class_id)

    def _examples(self, c: Any, workspace_id: str, class_ids: Sequence[str] | None) -> ExampleSet:
        sql = "SELECT id, class_id, embedding FROM examples WHERE workspace_id = ?"
        params: list[Any] = [workspace_id]
        if class_ids is not None:
            if not class_ids:
                return ExampleSet([], [], np.zeros((0, 0), np.float32))
            sql += f" AND class_id IN ({', '.join('?' * len(class_ids))})"
            params += list(class_ids)
        rows = self._exec(c, sql + " ORDER BY class_id, created_unix, id", params).fetchall()
        if not rows:
            return ExampleSet([], [], np.zeros((0, 0), np.float32))
        emb = np.stack([np.frombuffer(bytes(r[2]), dtype=np.float32) for r in rows])
        return ExampleSet([r[0] for r in rows], [r[1] for r in rows], emb)

    @_guarded
    def examples(self, workspace_id: str, class_ids: Sequence[str] | None = None) -> ExampleSet:
        """Embeddings of the given classes (all classes when None), ordered by class then insertion."""
        with self._read() as c:
            return self._examples(c, workspace_id, class_ids)

    @_guarded
    def changes(self, workspace_id: str, known: dict[str, int]) -> WorkspaceChanges | None:
        """One consistent read of what changed since `known` (class id -> version): the workspace
        version, every class's (label, version), and the examples of new or changed classes.
        None when the workspace does not exist."""
        with self._snapshot() as c:
            row = self._exec(c, "SELECT version FROM workspaces WHERE id = ?", (workspace_id,)).fetchone()
            if row is None:
                return None
            classes = self._class_versions(c, workspace_id)
            changed = [cid for cid, (_, v) in classes.items() if known.get(cid) != v]
            everything = len(changed) == len(classes)  # a first load: no IN list (bounded parameter counts)
            return WorkspaceChanges(int(row[0]), classes, changed,
                                    self._examples(c, workspace_id, None if everything else changed))

    @_guarded
    def thumbnails(self, workspace_id: str, example_ids: Sequence[str]) -> dict[str, bytes]:
        if not example_ids:
            return {}
        with self._read() as c:
            rows = self._exec(c, f"SELECT id, thumbnail FROM examples WHERE workspace_id = ? AND id IN "
                              f"({', '.join('?' * len(example_ids))})", (workspace_id, *example_ids)).fetchall()
        return {r[0]: bytes(r[1]) for r in rows}

    @_guarded
    def class_example_ids(self, workspace_id: str, class_id: str) -> list[str]:
        with self._read() as c:
            rows = self._exec(c, "SELECT id FROM examples WHERE workspace_id = ? AND class_id = ? "
                              "ORDER BY created_unix, id", (workspace_id, class_id)).fetchall()
        return [r[0] for r in rows]


@dataclass(frozen=True)
class WorkspaceChanges:
    version: int
    classes: dict[str, tuple[str, int]]  # every class: id -> (label, version)
    changed: list[str]  # classes new or changed since the caller's view
    examples: ExampleSet  # the examples of `changed`


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (0600) if it does not exist: it holds key
    hashes, embeddings and thumbnails. SQLite gives its -wal and -shm files the same mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SQLiteStore(Store):
    """SQLite in WAL mode; one connection per thread; writes take the lock up front (BEGIN IMMEDIATE)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(self.path)
        self._write_lock = threading.Lock()
        self.version_reads = Tally()
        self._init_connections()
        with self._tx() as c:
            for stmt in _schema("BLOB"):
                c.execute(stmt)
            self._migrate(c)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: atomic and safe against process kills
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute(begin)
        try:
            yield conn
            conn.execute("COMMIT")  # a failed COMMIT (disk full) leaves the transaction open
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # Writers of this process queue on a lock rather than in SQLite's busy handler, which
        # sleeps and retries (seconds of tail latency under 32 concurrent writers); other
        # processes still meet BEGIN IMMEDIATE's lock and busy_timeout.
        with self._write_lock, self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        with self._transaction("BEGIN DEFERRED") as conn:  # WAL: reads see one snapshot
            yield conn

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def _columns(self, c: Any, table: str) -> set[str]:
        return {r[1] for r in c.execute(f"PRAGMA table_info({table})").fetchall()}

    def _failure_kind(self, exc: BaseException) -> str | None:
        # disk full, read-only file system, locked past busy_timeout, I/O error: not the client's fault
        return "unavailable" if isinstance(exc, sqlite3.OperationalError) else None

    def _unavailable_message(self, exc: BaseException) -> str:
        text = str(exc).lower()
        if "full" in text:
            return "the database disk is full; nothing was saved: free space on the server, then retry"
        if "readonly" in text or "read-only" in text:
            return "the database is read-only; nothing was saved: the operator must make it writable"
        if "locked" in text or "busy" in text:
            return "the database is busy; nothing was saved: retry shortly"
        return "the database failed; nothing was saved: retry shortly"


class PostgresStore(Store):
    """PostgreSQL through psycopg 3 and a psycopg_pool connection pool.

    Connections are checked on checkout (a dead one, e.g. after a server restart, is replaced,
    not handed out); reconnection backs off at most `reconnect_s` before the pool gives up and
    grows again on the next request, so service recovers within seconds of the server's return.
    A request waits at most `timeout_s` for a connection, then gets `StoreUnavailable` (503).

    Every change notifies `notify.CHANNEL` in its transaction; with `notifications`, a listener
    thread (one more connection, outside the pool) keeps `feed` up to date (`fewshot.service.notify`).
    """

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 16, timeout_s: float = 3.0,
                 reconnect_s: float = 3.0, notifications: bool = False) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self._psycopg = psycopg
        self.version_reads = Tally()
        self._listener: PgListener | None = None
        try:
            self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size, timeout=timeout_s,
                                        reconnect_timeout=reconnect_s, kwargs={"autocommit": True},
                                        check=ConnectionPool.check_connection, open=False, name="fewshot")
        except Exception as exc:  # a malformed URL: the driver's message may quote it
            raise StoreError(f"cannot use PostgreSQL URL {self.safe_url}: {type(exc).__name__}: "
                             f"{scrub_secrets(str(exc), url)}") from None
        try:
            self._pool.open(wait=True, timeout=timeout_s + reconnect_s)
        except Exception as exc:
            self._pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {self.safe_url} ({type(exc).__name__}); "
                             "check that the server runs and the URL, user and password") from None
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(4242001)")  # concurrent first starts create once
            for stmt in _schema("BYTEA"):
                c.execute(stmt)
            self._migrate(c)
        if notifications:
            self.feed = VersionFeed()
            self._listener = PgListener(url, self.feed).start()

    def _connect(self) -> Any:
        raise AssertionError("PostgresStore takes connections from its pool")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self._pool.close()

    def _changed(self, c: Any, workspace_id: str, version: int | None) -> None:
        # delivered to every listener of the database on COMMIT, never on ROLLBACK
        self._exec(c, "SELECT pg_notify(?, ?)", (CHANNEL, payload(workspace_id, version)))

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Any]:
        with self._pool.connection() as conn:
            conn.execute(begin)
            try:
                yield conn
            except BaseException:
                if not conn.closed:
                    with suppress(self._psycopg.Error):  # a broken connection is discarded by the pool
                        conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except self._psycopg.OperationalError as exc:
                raise _CommitUnknown() from exc

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._transaction("BEGIN") as conn:
            yield conn

    @contextmanager
    def _snapshot(self) -> Iterator[Any]:
        with self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as conn:
            yield conn

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    def _columns(self, c: Any, table: str) -> set[str]:
        rows = self._exec(c, "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                          "AND table_name = ?", (table,)).fetchall()
        return {r[0] for r in rows}

    def _failure_kind(self, exc: BaseException) -> str | None:
        from psycopg_pool import PoolTimeout

        if isinstance(exc, PoolTimeout):
            return "unavailable"
        if isinstance(exc, self._psycopg.OperationalError | self._psycopg.InterfaceError):
            return "connection"  # server restarted (AdminShutdown), connection dropped
        return None

    def _unavailable_message(self, exc: BaseException) -> str:
        return "the database is unavailable or overloaded (no PostgreSQL connection in time); retry shortly"


def open_store(url: str | Path, *, notifications: bool = False) -> Store:
    """`postgresql://...` -> PostgresStore (with `notifications`: listening for other processes'
    changes); `sqlite:///path`, or a plain path -> SQLiteStore (one process: nothing to listen to)."""
    s = str(url)
    if s.startswith(("postgresql://", "postgres://")):
        return PostgresStore(s, notifications=notifications)
    if s.startswith("sqlite:///"):
        return SQLiteStore(s[len("sqlite:///"):])
    if "://" in s:
        raise StoreError(f"store URL {redact_url(s)!r} is not supported; use sqlite:///path/to.db or postgresql://...")
    return SQLiteStore(s)
