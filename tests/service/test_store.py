"""The same store suite against SQLite and a real PostgreSQL server (no mocks)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fewshot.service.store import (
    SCHEMA_VERSION,
    ConflictError,
    InvalidInput,
    ModelIdentity,
    ModelMismatchError,
    NewExample,
    NotFoundError,
    Store,
    StoreError,
    open_store,
)

REPO = Path(__file__).resolve().parents[2]


def examples(n: int, dim: int = 8, seed: int = 0) -> list[NewExample]:
    rng = np.random.default_rng(seed)
    return [NewExample(rng.standard_normal(dim).astype(np.float32), b"\x89PNG-thumb") for _ in range(n)]


def test_model_identity_recorded_and_mismatch_refused(store: Store) -> None:
    store.check_model(ModelIdentity(64, "aaaa"))
    store.check_model(ModelIdentity(64, "aaaa"))  # idempotent
    assert store.model_identity() == ModelIdentity(64, "aaaa")
    store.check_model(ModelIdentity(32, "bbbb"))  # no workspace holds embeddings yet: any model may serve
    store.create_workspace("w", "h", {}, "aaaa")
    with pytest.raises(ModelMismatchError, match=r"1 workspace\(s\) of bundle aaaa \(64-d embeddings\), but this "
                       r"service serves only bbbb \(32-d\).*serve that bundle too"):
        store.check_model(ModelIdentity(32, "bbbb"))
    store.check_models([(ModelIdentity(32, "bbbb"), "photos"), (ModelIdentity(64, "aaaa"), "characters")])


def test_workspaces_record_their_model(store: Store) -> None:
    a = store.create_workspace("a", "ha", {}, "aaaa")
    b = store.create_workspace("b", "hb", {}, "bbbb")
    assert store.get_workspace(a.id).bundle_id == "aaaa" and store.get_workspace(b.id).bundle_id == "bbbb"  # type: ignore[union-attr]
    assert [w.bundle_id for w in store.list_workspaces()] == ["aaaa", "bbbb"]
    with pytest.raises(InvalidInput, match="needs the bundle id"):
        store.create_workspace("c", "hc", {}, "")


SCHEMA_1 = [  # the tables as schema version 1 made them (before workspaces recorded their model)
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE workspaces (id TEXT PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, "
    "settings TEXT NOT NULL, version BIGINT NOT NULL, created_unix DOUBLE PRECISION NOT NULL)",
    "INSERT INTO meta VALUES ('schema_version', '1'), ('embedding_dim', '64'), ('bundle_id', 'aaaa')",
    "INSERT INTO workspaces VALUES ('ws_0123456789abcdef', 'old', 'h-old', '{}', 3, 1.0)",
]


def _schema_1(url: str) -> None:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            for stmt in SCHEMA_1:
                conn.execute(stmt)
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for stmt in SCHEMA_1:
            conn.execute(stmt)


def test_schema_1_store_migrates_to_its_one_model(store_url: str) -> None:
    _schema_1(store_url)
    s = open_store(store_url)
    try:
        old = s.get_workspace("ws_0123456789abcdef")
        assert old is not None and old.bundle_id == "aaaa" and old.version == 3  # the bundle that filled it
        with pytest.raises(ModelMismatchError, match="1 workspace\\(s\\) of bundle aaaa"):
            s.check_models([(ModelIdentity(32, "bbbb"), "photos")])
        s.check_models([(ModelIdentity(64, "aaaa"), "characters"), (ModelIdentity(32, "bbbb"), "photos")])
        assert s.create_workspace("new", "h-new", {}, "bbbb").bundle_id == "bbbb"
    finally:
        s.close()
    s = open_store(store_url)  # a second open finds the migrated schema and changes nothing
    try:
        assert [w.bundle_id for w in s.list_workspaces()] == ["aaaa", "bbbb"]
    finally:
        s.close()


def _sql(url: str, stmt: str) -> list[tuple[object, ...]]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            return conn.execute(stmt).fetchall()
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(stmt)
        return cur.fetchall() if cur.description else []


def test_store_is_stamped_with_its_schema_version_when_created(store_url: str) -> None:
    open_store(store_url).close()
    assert _sql(store_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


def test_a_database_of_a_newer_schema_is_refused_and_not_restamped(store_url: str) -> None:
    s = open_store(store_url)
    s.check_models([(ModelIdentity(64, "aaaa"), "characters")])
    s.close()
    newer = str(SCHEMA_VERSION + 1)
    _sql(store_url, f"UPDATE meta SET value = '{newer}' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match=f"schema version '{newer}', newer than this fewshot's {SCHEMA_VERSION}"):
        open_store(store_url)
    assert _sql(store_url, "SELECT value FROM meta WHERE key = 'schema_version'") == [(newer,)]


def test_class_lifecycle_and_versions(store: Store) -> None:
    ws = store.create_workspace("birds", "hash1", {"metric": "euclidean"}, "aaaa")
    assert store.get_workspace(ws.id) == ws and store.workspace_by_key_hash("hash1") == ws
    v0 = store.workspace_version(ws.id)
    rec, ids = store.add_class(ws.id, "robin", examples(3))
    assert rec.label == "robin" and rec.n_examples == 3 and len(ids) == 3
    assert store.workspace_version(ws.id) == v0 + 1 == rec.version
    rec2, more = store.add_examples(ws.id, rec.id, examples(2, seed=1))
    assert rec2.n_examples == 5 and rec2.version == v0 + 2
    ex = store.examples(ws.id, [rec.id])
    assert ex.embeddings.shape == (5, 8) and ex.embeddings.dtype == np.float32 and set(ex.ids) == set(ids + more)
    np.testing.assert_array_equal(ex.embeddings[: 3], np.stack([e.embedding for e in examples(3)]))
    assert store.thumbnails(ws.id, ids[:1]) == {ids[0]: b"\x89PNG-thumb"}
    assert store.rename_class(ws.id, rec.id, "european robin").label == "european robin"
    with pytest.raises(ConflictError, match="already exists"):
        store.add_class(ws.id, "european robin", examples(1))
    store.add_class(ws.id, "wren", examples(1))
    with pytest.raises(ConflictError):
        store.rename_class(ws.id, rec.id, "wren")
    assert [c.label for c in store.list_classes(ws.id)] == ["european robin", "wren"]
    store.delete_class(ws.id, rec.id)
    assert [c.label for c in store.list_classes(ws.id)] == ["wren"]
    assert store.examples(ws.id, [rec.id]).ids == []
    with pytest.raises(NotFoundError):
        store.delete_class(ws.id, rec.id)
    with pytest.raises(NotFoundError):
        store.add_class("ws_missing", "x", examples(1))


def test_workspaces_are_isolated(store: Store) -> None:
    a = store.create_workspace("a", "ha", {}, "aaaa")
    b = store.create_workspace("b", "hb", {}, "aaaa")
    rec, ids = store.add_class(a.id, "cat", examples(2))
    assert store.list_classes(b.id) == []
    with pytest.raises(NotFoundError):
        store.add_examples(b.id, rec.id, examples(1))
    with pytest.raises(NotFoundError):
        store.rename_class(b.id, rec.id, "dog")
    with pytest.raises(NotFoundError):
        store.delete_class(b.id, rec.id)
    assert store.thumbnails(b.id, ids) == {}
    store.add_class(b.id, "cat", examples(1))  # same label in another workspace is fine
    store.delete_workspace(a.id)
    assert store.get_workspace(a.id) is None and [c.label for c in store.list_classes(b.id)] == ["cat"]


def failing_after(n_ok: int, items: list[NewExample]) -> Iterator[NewExample]:
    for i, item in enumerate(items):
        if i == n_ok:
            raise RuntimeError("injected failure mid-registration")
        yield item


def test_failure_mid_registration_leaves_no_half_class(store: Store) -> None:
    ws = store.create_workspace("w", "h", {}, "aaaa")
    v = store.workspace_version(ws.id)
    with pytest.raises(RuntimeError, match="injected"):
        store.add_class(ws.id, "half", failing_after(3, examples(5)))
    assert store.list_classes(ws.id) == [] and store.examples(ws.id).ids == []
    assert store.workspace_version(ws.id) == v
    rec, _ = store.add_class(ws.id, "whole", examples(2))
    with pytest.raises(RuntimeError):
        store.add_examples(ws.id, rec.id, failing_after(1, examples(3)))
    assert store.get_class(ws.id, rec.id).n_examples == 2
    with pytest.raises(StoreError, match="at least one image"):
        store.add_class(ws.id, "empty", [])
    assert [c.label for c in store.list_classes(ws.id)] == ["whole"]


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from fewshot.service.store import NewExample, open_store
    store = open_store(sys.argv[1])
    def items():
        for i in range(5):
            if i == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # the process dies with the transaction open
            yield NewExample(np.ones(8, np.float32) * i, b"png")
    store.add_class(sys.argv[2], "killed", items())
""")


def test_kill_mid_registration_leaves_no_half_class(store: Store, store_url: str) -> None:
    ws = store.create_workspace("w", "h", {}, "aaaa")
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, store_url, ws.id], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == -signal.SIGKILL, r.stderr
    fresh = open_store(store_url)
    try:
        assert fresh.list_classes(ws.id) == [] and fresh.examples(ws.id).ids == []
        fresh.add_class(ws.id, "killed", examples(1))  # the label is free: nothing half-written holds it
    finally:
        fresh.close()


WRITER_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from fewshot.service.store import NewExample, open_store
    store = open_store(sys.argv[1])
    for i in range(int(sys.argv[3])):
        store.add_class(sys.argv[2], f"{sys.argv[4]}-{i}", [NewExample(np.full(8, i, np.float32), b"png")])
""")


def test_concurrent_processes_see_each_others_classes(store: Store, store_url: str) -> None:
    ws = store.create_workspace("shared", "h", {}, "aaaa")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, store_url, ws.id, "10", f"p{p}"], env=env,
                              stderr=subprocess.PIPE) for p in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    labels = {c.label for c in store.list_classes(ws.id)}
    assert labels == {f"p{p}-{i}" for p in range(3) for i in range(10)}
    assert store.workspace_version(ws.id) == 30  # every change bumped the counter exactly once


def test_unsupported_url() -> None:
    with pytest.raises(StoreError, match="not supported"):
        open_store("mysql://x")
