"""The same store suite against SQLite and a real PostgreSQL server (no mocks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fewshot.service.store import (
    ConflictError,
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
    with pytest.raises(ModelMismatchError, match="holds 64-d embeddings but the bundle makes 32-d"):
        store.check_model(ModelIdentity(32, "bbbb"))
    with pytest.raises(ModelMismatchError, match="filled by bundle aaaa"):
        store.check_model(ModelIdentity(64, "bbbb"))


def test_class_lifecycle_and_versions(store: Store) -> None:
    ws = store.create_workspace("birds", "hash1", {"metric": "euclidean"})
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
    a = store.create_workspace("a", "ha", {})
    b = store.create_workspace("b", "hb", {})
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
    ws = store.create_workspace("w", "h", {})
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
    ws = store.create_workspace("w", "h", {})
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
    ws = store.create_workspace("shared", "h", {})
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
