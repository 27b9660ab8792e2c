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

Layout: `records` (what is stored, errors), `schema` (tables, version, migrations), `backend`
(the contract each backend supplies), `operations` (the operations, once for both), `sqlite` and
`postgres` (the backends).
"""

from __future__ import annotations

from pathlib import Path

from fewshot.io import redact_url
from fewshot.service.store import records
from fewshot.service.store.backend import scrub_secrets
from fewshot.service.store.operations import Store
from fewshot.service.store.postgres import PostgresStore
from fewshot.service.store.records import *  # noqa: F403  (the records' names, listed in records.__all__)
from fewshot.service.store.schema import SCHEMA_VERSION
from fewshot.service.store.sqlite import SQLiteStore

__all__ = [
    *records.__all__, "SCHEMA_VERSION", "PostgresStore", "SQLiteStore", "Store", "open_store", "scrub_secrets",
]


def open_store(url: str | Path, *, notifications: bool = False) -> Store:
    """`postgresql://...` -> PostgresStore (with `notifications`: listening for other processes'
    changes); `sqlite:///path`, or a plain path -> SQLiteStore (one process: nothing to listen to)."""
    s = str(url)
    if s.startswith(("postgresql://", "postgres://")):
        return PostgresStore(s, notifications=notifications)
    if s.startswith("sqlite:///"):
        return SQLiteStore(s[len("sqlite:///"):])
    if "://" in s:
        raise records.StoreError(f"store URL {redact_url(s)!r} is not supported; use sqlite:///path/to.db or postgresql://...")
    return SQLiteStore(s)
