"""Persistent class memory: workspaces, hashed API keys, classes, examples and the model identity.

The store is the source of truth; the recogniser keeps prototypes in memory and re-syncs a
workspace when its `version` (bumped in the same transaction as every change) moves. Every change
is one transaction, so a crash or exception mid-registration leaves no half class.

Backends: `SQLiteStore` (default; WAL, one connection per thread) and `PostgresStore`
(psycopg 3, one connection per thread). Both run the same SQL, written with `?` placeholders.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.errors import FewshotError

SCHEMA_VERSION = 1


class StoreError(FewshotError):
    """The store cannot do what was asked."""


class NotFoundError(StoreError):
    """A workspace, class or example does not exist (in this workspace)."""


class ConflictError(StoreError):
    """A change conflicts with what is stored (e.g. a duplicate class label)."""


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


def _schema(blob: str) -> list[str]:
    return [
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS workspaces (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
        "key_hash TEXT NOT NULL UNIQUE, settings TEXT NOT NULL, version BIGINT NOT NULL, "
        "created_unix DOUBLE PRECISION NOT NULL)",
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

    # -- one connection per thread -------------------------------------------------------------
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
        """A connection for reads."""
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
        return conn.execute(self._sql(sql), tuple(params))

    # -- model identity ----------------------------------------------------------------------
    def check_model(self, model: ModelIdentity) -> None:
        """Record the model on first use; refuse a store filled by another model."""
        with self._tx() as c:
            rows = dict(self._exec(c, "SELECT key, value FROM meta").fetchall())
            if "embedding_dim" not in rows:
                for k, v in (("schema_version", SCHEMA_VERSION), ("embedding_dim", model.embedding_dim),
                             ("bundle_id", model.bundle_id)):
                    self._exec(c, "INSERT INTO meta (key, value) VALUES (?, ?)", (k, str(v)))
                return
        dim, bid = int(rows["embedding_dim"]), rows["bundle_id"]
        if dim != model.embedding_dim:
            raise ModelMismatchError(
                f"store {self.url} holds {dim}-d embeddings but the bundle makes "
                f"{model.embedding_dim}-d ones; use a new database for this bundle or serve bundle {bid}"
            )
        if bid != model.bundle_id:
            raise ModelMismatchError(
                f"store {self.url} was filled by bundle {bid}, not {model.bundle_id}: embeddings of "
                "different models are not comparable; use a new database or serve the original bundle"
            )

    def model_identity(self) -> ModelIdentity | None:
        with self._read() as c:
            rows = dict(self._exec(c, "SELECT key, value FROM meta").fetchall())
        if "embedding_dim" not in rows:
            return None
        return ModelIdentity(int(rows["embedding_dim"]), rows["bundle_id"])

    # -- workspaces ----------------------------------------------------------------------------
    def create_workspace(self, name: str, key_hash: str, settings: dict[str, Any]) -> WorkspaceRecord:
        ws = WorkspaceRecord(new_id("ws"), name, key_hash, dict(settings), 0)
        with self._tx() as c:
            self._exec(c, "INSERT INTO workspaces (id, name, key_hash, settings, version, created_unix) "
                       "VALUES (?, ?, ?, ?, 0, ?)", (ws.id, name, key_hash, json.dumps(settings), time.time()))
        return ws

    def _ws_row(self, where: str, value: str) -> WorkspaceRecord | None:
        with self._read() as c:
            row = self._exec(c, f"SELECT id, name, key_hash, settings, version FROM workspaces WHERE {where} = ?",
                             (value,)).fetchone()
        return None if row is None else WorkspaceRecord(row[0], row[1], row[2], json.loads(row[3]), int(row[4]))

    def get_workspace(self, workspace_id: str) -> WorkspaceRecord | None:
        return self._ws_row("id", workspace_id)

    def workspace_by_key_hash(self, key_hash: str) -> WorkspaceRecord | None:
        return self._ws_row("key_hash", key_hash)

    def list_workspaces(self) -> list[WorkspaceRecord]:
        with self._read() as c:
            rows = self._exec(c, "SELECT id, name, key_hash, settings, version FROM workspaces ORDER BY created_unix").fetchall()
        return [WorkspaceRecord(r[0], r[1], r[2], json.loads(r[3]), int(r[4])) for r in rows]

    def workspace_version(self, workspace_id: str) -> int | None:
        """The cheap change check: one indexed row read."""
        with self._read() as c:
            row = self._exec(c, "SELECT version FROM workspaces WHERE id = ?", (workspace_id,)).fetchone()
        return None if row is None else int(row[0])

    def _bump(self, c: Any, workspace_id: str) -> int:
        row = self._exec(c, "UPDATE workspaces SET version = version + 1 WHERE id = ? RETURNING version",
                         (workspace_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"workspace {workspace_id!r} does not exist; create it with POST /workspaces")
        return int(row[0])

    def update_workspace_settings(self, workspace_id: str, settings: dict[str, Any]) -> WorkspaceRecord:
        with self._tx() as c:
            self._bump(c, workspace_id)
            self._exec(c, "UPDATE workspaces SET settings = ? WHERE id = ?", (json.dumps(settings), workspace_id))
        ws = self.get_workspace(workspace_id)
        assert ws is not None
        return ws

    def delete_workspace(self, workspace_id: str) -> None:
        with self._tx() as c:
            self._exec(c, "DELETE FROM examples WHERE workspace_id = ?", (workspace_id,))
            self._exec(c, "DELETE FROM classes WHERE workspace_id = ?", (workspace_id,))
            if self._exec(c, "DELETE FROM workspaces WHERE id = ?", (workspace_id,)).rowcount == 0:
                raise NotFoundError(f"workspace {workspace_id!r} does not exist")

    # -- classes and examples ----------------------------------------------------------------------
    def _insert_examples(self, c: Any, workspace_id: str, class_id: str, examples: Iterable[NewExample]) -> list[str]:
        ids = []
        for ex in examples:  # may be a generator: a failure midway rolls the whole transaction back
            eid = new_id("ex")
            emb = np.ascontiguousarray(ex.embedding, dtype=np.float32).tobytes()
            self._exec(c, "INSERT INTO examples (id, class_id, workspace_id, embedding, thumbnail, created_unix) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (eid, class_id, workspace_id, emb, ex.thumbnail_png, time.time()))
            ids.append(eid)
        if not ids:
            raise StoreError("a class needs at least one image; upload 1 or more")
        return ids

    def add_class(self, workspace_id: str, label: str, examples: Iterable[NewExample]) -> tuple[ClassRecord, list[str]]:
        """Create a class with its examples in one transaction; returns it and the example ids."""
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
        return ClassRecord(cid, label, v, len(ids)), ids

    def add_examples(self, workspace_id: str, class_id: str, examples: Iterable[NewExample]) -> tuple[ClassRecord, list[str]]:
        with self._tx() as c:
            v = self._bump(c, workspace_id)
            self._require_class(c, workspace_id, class_id)
            self._exec(c, "UPDATE classes SET version = ? WHERE id = ?", (v, class_id))
            ids = self._insert_examples(c, workspace_id, class_id, examples)
        return self.get_class(workspace_id, class_id), ids

    def _require_class(self, c: Any, workspace_id: str, class_id: str) -> None:
        row = self._exec(c, "SELECT 1 FROM classes WHERE id = ? AND workspace_id = ?", (class_id, workspace_id)).fetchone()
        if row is None:
            raise NotFoundError(f"class {class_id!r} does not exist in workspace {workspace_id!r}; list classes first")

    def rename_class(self, workspace_id: str, class_id: str, label: str) -> ClassRecord:
        try:
            with self._tx() as c:
                v = self._bump(c, workspace_id)
                self._require_class(c, workspace_id, class_id)
                self._exec(c, "UPDATE classes SET label = ?, version = ? WHERE id = ?", (label, v, class_id))
        except Exception as exc:
            if self._is_unique_violation(exc):
                raise ConflictError(f"class label {label!r} already exists in workspace {workspace_id!r}; "
                                    "choose another label") from exc
            raise
        return self.get_class(workspace_id, class_id)

    def delete_class(self, workspace_id: str, class_id: str) -> None:
        with self._tx() as c:
            self._bump(c, workspace_id)
            self._require_class(c, workspace_id, class_id)
            self._exec(c, "DELETE FROM examples WHERE class_id = ?", (class_id,))
            self._exec(c, "DELETE FROM classes WHERE id = ?", (class_id,))

    _CLASS_SELECT = ("SELECT c.id, c.label, c.version, COUNT(e.id) FROM classes c "
                     "LEFT JOIN examples e ON e.class_id = c.id WHERE c.workspace_id = ? ")

    def list_classes(self, workspace_id: str) -> list[ClassRecord]:
        with self._read() as c:
            rows = self._exec(c, self._CLASS_SELECT + "GROUP BY c.id, c.label, c.version, c.created_unix "
                              "ORDER BY c.created_unix, c.id", (workspace_id,)).fetchall()
        return [ClassRecord(r[0], r[1], int(r[2]), int(r[3])) for r in rows]

    def class_versions(self, workspace_id: str) -> dict[str, tuple[str, int]]:
        """class id -> (label, version): what a sync compares against its cache."""
        with self._read() as c:
            rows = self._exec(c, "SELECT id, label, version FROM classes WHERE workspace_id = ?", (workspace_id,)).fetchall()
        return {r[0]: (r[1], int(r[2])) for r in rows}

    def get_class(self, workspace_id: str, class_id: str) -> ClassRecord:
        with self._read() as c:
            row = self._exec(c, self._CLASS_SELECT + "AND c.id = ? GROUP BY c.id, c.label, c.version",
                             (workspace_id, class_id)).fetchone()
        if row is None:
            raise NotFoundError(f"class {class_id!r} does not exist in workspace {workspace_id!r}; list classes first")
        return ClassRecord(row[0], row[1], int(row[2]), int(row[3]))

    def examples(self, workspace_id: str, class_ids: Sequence[str] | None = None) -> ExampleSet:
        """Embeddings of the given classes (all classes when None), ordered by class then insertion."""
        sql = "SELECT id, class_id, embedding FROM examples WHERE workspace_id = ?"
        params: list[Any] = [workspace_id]
        if class_ids is not None:
            if not class_ids:
                return ExampleSet([], [], np.zeros((0, 0), np.float32))
            sql += f" AND class_id IN ({', '.join('?' * len(class_ids))})"
            params += list(class_ids)
        with self._read() as c:
            rows = self._exec(c, sql + " ORDER BY class_id, created_unix, id", params).fetchall()
        if not rows:
            return ExampleSet([], [], np.zeros((0, 0), np.float32))
        emb = np.stack([np.frombuffer(bytes(r[2]), dtype=np.float32) for r in rows])
        return ExampleSet([r[0] for r in rows], [r[1] for r in rows], emb)

    def thumbnails(self, workspace_id: str, example_ids: Sequence[str]) -> dict[str, bytes]:
        if not example_ids:
            return {}
        with self._read() as c:
            rows = self._exec(c, f"SELECT id, thumbnail FROM examples WHERE workspace_id = ? AND id IN "
                              f"({', '.join('?' * len(example_ids))})", (workspace_id, *example_ids)).fetchall()
        return {r[0]: bytes(r[1]) for r in rows}

    def class_example_ids(self, workspace_id: str, class_id: str) -> list[str]:
        with self._read() as c:
            rows = self._exec(c, "SELECT id FROM examples WHERE workspace_id = ? AND class_id = ? "
                              "ORDER BY created_unix, id", (workspace_id, class_id)).fetchall()
        return [r[0] for r in rows]


class SQLiteStore(Store):
    """SQLite in WAL mode; one connection per thread; writes take the lock up front (BEGIN IMMEDIATE)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_connections()
        with self._tx() as c:
            for stmt in _schema("BLOB"):
                c.execute(stmt)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: atomic and safe against process kills
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)


class PostgresStore(Store):
    """PostgreSQL through psycopg 3; one autocommit connection per thread, explicit transactions."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self._psycopg = psycopg
        self._init_connections()
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(4242001)")  # concurrent first starts create once
            for stmt in _schema("BYTEA"):
                c.execute(stmt)

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True)
        except self._psycopg.OperationalError as exc:
            raise StoreError(f"cannot connect to PostgreSQL at {self.url} ({exc}); check the URL and server") from exc

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        conn = self._conn()
        with conn.transaction():
            yield conn

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)


def open_store(url: str | Path) -> Store:
    """`postgresql://...` -> PostgresStore; `sqlite:///path`, or a plain path -> SQLiteStore."""
    s = str(url)
    if s.startswith(("postgresql://", "postgres://")):
        return PostgresStore(s)
    if s.startswith("sqlite:///"):
        return SQLiteStore(s[len("sqlite:///"):])
    if "://" in s:
        raise StoreError(f"store URL {s!r} is not supported; use sqlite:///path/to.db or postgresql://...")
    return SQLiteStore(s)
