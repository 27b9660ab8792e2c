"""The store's operations, written once in `?`-placeholder SQL for both backends: the served
models' identity, workspaces, classes and examples. Every change is one transaction that bumps
the workspace's `version`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from fewshot.service.store.backend import StoreBackend, _guarded
from fewshot.service.store.records import (
    ClassRecord,
    ConflictError,
    ExampleSet,
    InvalidInput,
    ModelIdentity,
    ModelMismatchError,
    NewExample,
    NotFoundError,
    StoreError,
    WorkspaceChanges,
    WorkspaceRecord,
    new_id,
)
from fewshot.service.store.schema import migrate


class Store(StoreBackend):
    """Backend-neutral operations; subclasses (`SQLiteStore`, `PostgresStore`) supply connections,
    transactions and dialect."""

    def _migrate(self, c: Any) -> None:
        migrate(c, self._exec, self._columns(c, "workspaces"))

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
                for k, v in (("embedding_dim", first.embedding_dim), ("bundle_id", first.bundle_id)):
                    self._exec(c, "INSERT INTO meta (key, value) VALUES (?, ?)", (k, str(v)))
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

    def _read_workspace(self, where: str, value: str) -> WorkspaceRecord | None:
        with self._read() as c:
            ws = self._ws_row(c, where, value)
        if ws is not None:
            self._observe(ws.id, ws.version)
        return ws

    @_guarded
    def get_workspace(self, workspace_id: str) -> WorkspaceRecord | None:
        return self._read_workspace("id", workspace_id)

    @_guarded
    def workspace_by_key_hash(self, key_hash: str) -> WorkspaceRecord | None:
        return self._read_workspace("key_hash", key_hash)

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
        if row is None:
            return None
        self._observe(workspace_id, int(row[0]))
        return int(row[0])

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
    def merge_workspace_settings(self, workspace_id: str, merge: Callable[[dict[str, Any]], dict[str, Any]], *,
                                 if_version: int | None = None) -> WorkspaceRecord:
        """Read-modify-write of a workspace's settings in one transaction (the version bump locks
        the row first), so concurrent partial updates never overwrite each other. `if_version`:
        apply only if the workspace is still at that version, else ConflictError and no change."""
        with self._tx() as c:
            v = self._bump(c, workspace_id)
            if if_version is not None and v != if_version + 1:
                raise ConflictError(f"workspace {workspace_id!r} changed (version {if_version} -> {v - 1}) while "
                                    "this change was prepared; nothing was changed: try again")
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

    @contextmanager
    def _unique_label(self, workspace_id: str, label: str, fix: str) -> Iterator[None]:
        """Turn the database's unique-label violation inside the block into a ConflictError."""
        try:
            yield
        except Exception as exc:
            if self._is_unique_violation(exc):
                raise ConflictError(f"class label {label!r} already exists in workspace {workspace_id!r}; {fix}") from exc
            raise

    @_guarded
    def add_class(self, workspace_id: str, label: str, examples: Iterable[NewExample]) -> tuple[ClassRecord, list[str]]:
        """Create a class with its examples in one transaction; returns it and the example ids."""
        examples = list(examples)  # a retry after a dropped connection needs them again
        cid = new_id("cls")
        with self._unique_label(workspace_id, label, "add images to it or choose another label"), self._tx() as c:
            v = self._bump(c, workspace_id)
            self._exec(c, "INSERT INTO classes (id, workspace_id, label, version, created_unix) "
                       "VALUES (?, ?, ?, ?, ?)", (cid, workspace_id, label, v, time.time()))
            ids = self._insert_examples(c, workspace_id, cid, examples)
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
        with self._unique_label(workspace_id, label, "choose another label"), self._tx() as c:
            v = self._bump(c, workspace_id)
            self._require_class(c, workspace_id, class_id)
            self._exec(c, "UPDATE classes SET label = ?, version = ? WHERE id = ?", (label, v, class_id))
            rec = self._class_row(c, workspace_id, class_id)
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
