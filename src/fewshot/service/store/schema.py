"""The store's tables, its schema version and the migrations between versions; the same SQL
for both backends (`blob` is the dialect's byte type: BLOB in SQLite, BYTEA in PostgreSQL).

Versions: 1 = one model per store (its identity in `meta`); 2 = each workspace records its model
(`workspaces.bundle_id`, table `models`). A database stamped with a newer version than this code
knows is refused rather than written with the old rules (and never re-stamped older).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fewshot.service.store.records import StoreError

SCHEMA_VERSION = 2

Exec = Callable[[Any, str, Sequence[Any]], Any]  # (connection, `?` SQL, params) -> cursor


def statements(blob: str) -> list[str]:
    """CREATE statements of the current schema (idempotent)."""
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


def migrate(c: Any, execute: Exec, workspace_columns: set[str]) -> None:
    """Bring the database on connection `c` (inside a write transaction) to `SCHEMA_VERSION` and
    stamp it; refuse one written by a newer schema.

    1 -> 2: stores of one model gain `workspaces.bundle_id`; their workspaces are assigned the one
    bundle recorded in `meta` (the bundle that filled them)."""
    meta = dict(execute(c, "SELECT key, value FROM meta", ()).fetchall())
    stored = meta.get("schema_version")
    if stored is not None and (not stored.isdigit() or int(stored) > SCHEMA_VERSION):
        raise StoreError(f"the database has schema version {stored!r}, newer than this fewshot's "
                         f"{SCHEMA_VERSION}: upgrade fewshot to the version that wrote it, or use another database")
    if "bundle_id" not in workspace_columns:
        execute(c, "ALTER TABLE workspaces ADD COLUMN bundle_id TEXT", ())
    if "bundle_id" in meta:
        execute(c, "INSERT INTO models (bundle_id, embedding_dim, name) SELECT ?, ?, '' WHERE NOT EXISTS "
                "(SELECT 1 FROM models WHERE bundle_id = ?)",
                (meta["bundle_id"], int(meta["embedding_dim"]), meta["bundle_id"]))
        execute(c, "UPDATE workspaces SET bundle_id = ? WHERE bundle_id IS NULL", (meta["bundle_id"],))
    if stored is None:
        execute(c, "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    else:
        execute(c, "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
