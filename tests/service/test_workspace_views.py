"""Issue 16: a classify costs one cheap store read (the workspace's version); the workspace's record
and class memory are kept in memory by version (`fewshot.service.views`, `fewshot.service.memory`),
and a change made through another process on the same store (a replica on one PostgreSQL database,
a second process on the SQLite file) is seen by that process's next request."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_helpers import class_images
from test_app import auth, files, new_workspace, settings_for, teach

from fewshot.service.app import create_app

STORE_READS = ("get_workspace", "workspace_by_key_hash", "workspace_version", "changes", "class_versions",
               "examples", "list_classes", "get_class", "class_example_ids", "thumbnails", "model_identity")


def count_reads(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Calls of the store's read operations made through `client`'s app from now on."""
    store, calls = client.app.state.service.store, Counter[str]()  # type: ignore[attr-defined]

    def counted(name: str) -> Any:
        method = getattr(store, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return method(*args, **kwargs)

        return wrapper

    for name in STORE_READS:
        monkeypatch.setattr(store, name, counted(name))
    return calls


def top(client: TestClient, ws: str, key: str, seed: int, threshold: float | None = None) -> dict[str, Any]:
    data = {} if threshold is None else {"threshold": str(threshold)}
    r = client.post(f"/workspaces/{ws}/classify", files=files(class_images(seed, 6)[5:]), data=data, headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]  # type: ignore[no-any-return]


@pytest.fixture
def replicas(tiny_bundle: Path, tmp_path: Path, store_url: str) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps on one store, as two processes (each its own store connections, caches and, on
    PostgreSQL, notification listener)."""
    settings = settings_for(tiny_bundle, tmp_path, db_url=store_url)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        yield a, b


def test_a_classify_reads_only_the_workspace_version(replicas: tuple[TestClient, TestClient],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    a, _ = replicas
    ws, key = new_workspace(a)
    teach(a, ws, key, "a", 0)
    teach(a, ws, key, "b", 1)
    top(a, ws, key, 0)  # our own changes are applied locally; the record is read once per version
    calls = count_reads(a, monkeypatch)
    for _ in range(3):
        assert top(a, ws, key, 0)["label"] == "a"
    assert calls == Counter({"workspace_version": 3})
    calls.clear()
    r = a.post(f"/workspaces/{ws}/explain", files=files(class_images(0, 6)[5:], "image"), headers=auth(key))
    assert r.status_code == 200, r.text
    assert calls["workspace_version"] == 1 and calls["get_workspace"] == 0 and calls["changes"] == 0


def test_a_change_through_another_replica_is_seen_by_the_next_classify(
        replicas: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each change made through A is used by B's very next classify: the version B reads moved, so
    B reads the record (settings) and the changed classes again, and only then."""
    a, b = replicas
    ws, key = new_workspace(a)
    cls_a = teach(a, ws, key, "a", 0)
    teach(a, ws, key, "b", 1)
    assert top(b, ws, key, 0)["label"] == "a"  # B's caches are warm
    calls = count_reads(b, monkeypatch)
    assert top(b, ws, key, 0)["label"] == "a" and calls == Counter({"workspace_version": 1})

    r = a.patch(f"/workspaces/{ws}/classes/{cls_a['id']}", json={"label": "renamed"}, headers=auth(key))
    assert r.status_code == 200, r.text
    assert top(b, ws, key, 0)["label"] == "renamed"  # a class renamed
    assert calls["get_workspace"] == 1 and calls["changes"] == 1

    assert a.patch(f"/workspaces/{ws}", json={"threshold": 0.0}, headers=auth(key)).status_code == 200
    p = top(b, ws, key, 0)  # the settings changed: B's record of the workspace is read again
    assert p["threshold"] == 0.0 and p["label"] == "unknown"
    assert a.patch(f"/workspaces/{ws}", json={"threshold": None}, headers=auth(key)).status_code == 200
    assert top(b, ws, key, 0)["threshold"] != 0.0

    before = top(b, ws, key, 2)["top_k"]
    teach(a, ws, key, "c", 2)  # a class added
    after = top(b, ws, key, 2)
    assert after["label"] == "c" and len(after["top_k"]) == len(before) + 1

    assert a.delete(f"/workspaces/{ws}/classes/{cls_a['id']}", headers=auth(key)).status_code == 204
    assert {c["label"] for c in top(b, ws, key, 0)["top_k"]} == {"b", "c"}  # a class deleted

    assert a.delete(f"/workspaces/{ws}", headers=auth(key)).status_code == 204
    r = b.post(f"/workspaces/{ws}/classify", files=files(class_images(0, 6)[5:]), headers=auth(key))
    assert r.status_code == 401, r.text  # the workspace (and so its key) is gone
