"""Two `fewshot serve` replicas on one PostgreSQL database behave as one service:

  * a class taught, renamed or deleted through one replica is used by the very next classify on
    the other (and back);
  * concurrent additions to one class from both replicas lose nothing, and both replicas' in-memory
    prototypes equal a fresh recogniser's;
  * a request reads a workspace's version once (`fewshot_store_version_reads_total` on /metrics),
    with or without notifications (FEWSHOT_STORE_NOTIFICATIONS=0): that read is what lets the very
    next request on the other replica see a change before its notification arrives; the record and
    the classes are read again only when the version moved; a flood of notifications is absorbed;
  * a PostgreSQL restart (the listener's connection is lost): a change made through one replica
    right after is seen by the next request on the other, and the listener comes back;
  * a dead database at startup: a clear error, no password.

Real processes on a throwaway cluster with password auth (so a leaked secret is detectable):
@slow and @postgres.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fault_helpers import (
    ADMIN,
    PgCluster,
    ServiceProcess,
    auth,
    create_workspace,
    free_port,
    image_files,
)
from postgres_server import find_pg_bin

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
WAIT_S = 60.0  # a deadline for conditions, not a timing claim


def wait_for(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S:.0f} s: {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        if os.environ.get("FEWSHOT_REQUIRE_ALL", "").lower() in ("1", "true", "yes"):
            pytest.fail("required in CI but unavailable: PostgreSQL binaries (initdb, pg_ctl)")
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found; apt-get install -y postgresql")
    assert bin_dir is not None
    c = PgCluster(bin_dir)
    yield c
    c.close()


@pytest.fixture(scope="module")
def db(cluster: PgCluster) -> str:
    return cluster.database(f"replicas_{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def replicas(cluster: PgCluster, db: str, tiny_bundle: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    logs = tmp_path_factory.mktemp("replicas")
    a = ServiceProcess(tiny_bundle, db, logs / "a.log").start()
    try:
        b = ServiceProcess(tiny_bundle, db, logs / "b.log").start()
    except BaseException:
        a.kill()
        raise
    try:
        for r in (a, b):
            wait_for(lambda r=r: metric(r.url, "fewshot_store_listener_connected") == 1, f"{r.url} listening")
        yield a, b
    finally:
        a.kill()
        b.kill()
        for r in (a, b):  # the password never reaches a server log
            assert cluster.password not in r.log_tail(10_000_000)


def metric(url: str, name: str) -> float:
    r = httpx.get(url + "/metrics", headers=auth(ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    for line in r.text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not on /metrics")


def teach(url: str, ws: str, key: str, label: str, seed: int, n: int = 3) -> dict:  # type: ignore[type-arg]
    r = httpx.post(f"{url}/workspaces/{ws}/classes", data={"label": label}, files=image_files(seed, n),
                   headers=auth(key), timeout=30)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def top_k(url: str, ws: str, key: str, seed: int) -> list[dict]:  # type: ignore[type-arg]
    r = httpx.post(f"{url}/workspaces/{ws}/classify", data={"top_k": "100"}, files=image_files(seed, 1),
                   headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]["top_k"]  # type: ignore[no-any-return]


def classes_in(url: str, ws: str, key: str, seed: int = 999) -> dict[str, str]:
    """class id -> label, as the replica's in-memory prototypes answer a classify."""
    return {c["class_id"]: c["label"] for c in top_k(url, ws, key, seed)}


def test_a_change_on_one_replica_is_used_by_the_next_request_on_the_other(
        replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    a, b = replicas
    ws, key = create_workspace(a.url, "replicas-a")
    zero = teach(a.url, ws, key, "zero", 0)
    assert classes_in(b.url, ws, key) == {zero["id"]: "zero"}  # B's first sight
    for i in range(5):  # each time the very next request on the other replica
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        c = teach(src.url, ws, key, f"c{i}", 10 + i)
        assert classes_in(dst.url, ws, key).get(c["id"]) == f"c{i}", f"round {i}: {dst.url} missed {c['id']}"
    r = httpx.patch(f"{a.url}/workspaces/{ws}/classes/{zero['id']}", json={"label": "nought"}, headers=auth(key),
                    timeout=30)
    assert r.status_code == 200, r.text
    assert classes_in(b.url, ws, key)[zero["id"]] == "nought"
    r = httpx.delete(f"{a.url}/workspaces/{ws}/classes/{zero['id']}", headers=auth(key), timeout=30)
    assert r.status_code == 204, r.text
    assert zero["id"] not in classes_in(b.url, ws, key)
    r = httpx.post(f"{b.url}/workspaces/{ws}/classes/{list(classes_in(b.url, ws, key))[0]}/images",
                   files=image_files(50, 2), headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    added = r.json()
    counts = {c["id"]: c["n_examples"] for c in httpx.get(f"{a.url}/workspaces/{ws}/classes", headers=auth(key),
                                                          timeout=30).json()}
    assert counts[added["id"]] == 5
    r = httpx.delete(f"{b.url}/workspaces/{ws}", headers=auth(key), timeout=30)
    assert r.status_code == 204, r.text
    r = httpx.post(f"{a.url}/workspaces/{ws}/classify", files=image_files(1, 1), headers=auth(ADMIN), timeout=30)
    assert r.status_code == 404, r.text


def test_concurrent_additions_to_one_class_from_both_replicas_lose_nothing(
        replicas: tuple[ServiceProcess, ServiceProcess], tiny_bundle: Path, db: str) -> None:
    a, b = replicas
    ws, key = create_workspace(a.url, "replicas-b")
    cls = teach(a.url, ws, key, "shared", 0)
    other = teach(b.url, ws, key, "other", 1)
    acked, statuses, lock = [0], [], threading.Lock()

    def worker(url: str, seed: int) -> None:
        with httpx.Client(base_url=url, headers=auth(key), timeout=60) as http:
            for i in range(12):
                n = 1 + i % 2
                r = http.post(f"/workspaces/{ws}/classes/{cls['id']}/images", files=image_files(seed * 100 + i, n))
                if i % 4 == 0:  # classifies in between: snapshots are read while others change
                    http.post(f"/workspaces/{ws}/classify", files=image_files(seed, 1))
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        acked[0] += n

    threads = [threading.Thread(target=worker, args=(url, s)) for s, url in enumerate([a.url, b.url] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) == {200}, sorted(set(statuses))
    for r in (a, b):
        n = {c["id"]: c["n_examples"] for c in httpx.get(f"{r.url}/workspaces/{ws}/classes", headers=auth(key),
                                                         timeout=30).json()}
        assert n == {cls["id"]: 3 + acked[0], other["id"]: 3}
    # both replicas' in-memory prototypes equal a fresh recogniser's over the store
    from fewshot.service.app import open_state
    from fewshot.service.images import decode_upload
    from fewshot.service.settings import ServiceSettings

    state = open_state(ServiceSettings(bundle_path=str(tiny_bundle), db_url=db, store_notifications=False))
    try:
        probe = image_files(7, 1)[0][1][1]
        arr = decode_upload(probe, state.bundle.preprocessing, max_pixels=10**6, thumbnail_size=16, name="p",
                            thumbnail=False).array[None]
        want = {c.class_id: c.score for c in state.recogniser.classify(ws, arr, top_k=10)[0].top_k}
    finally:
        state.store.close()
    for r in (a, b):
        got = {c["class_id"]: c["score"] for c in top_k(r.url, ws, key, 7)}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[c] for c in want], list(want.values()), rtol=1e-4, atol=1e-5)


def test_one_version_read_per_request_with_or_without_notifications(
        replicas: tuple[ServiceProcess, ServiceProcess], cluster: PgCluster, db: str, tiny_bundle: Path,
        tmp_path: Path) -> None:
    """B reads a workspace's version once per request (24 requests, 4 changes through A), and so does
    a replica with notifications off. Then a flood of notifications (10,000 workspaces, and payloads
    that are not ours) is absorbed and B keeps answering correctly."""
    import psycopg

    a, b = replicas
    ws, key = create_workspace(a.url, "replicas-c")
    teach(a.url, ws, key, "base", 0)
    top_k(b.url, ws, key, 0)  # first sight
    reads0, notes0 = metric(b.url, "fewshot_store_version_reads_total"), metric(b.url, "fewshot_store_notifications_total")
    changes = 0
    for i in range(24):
        if i % 6 == 5:
            teach(a.url, ws, key, f"n{i}", 100 + i)
            changes += 1
        top_k(b.url, ws, key, i)
    reads = metric(b.url, "fewshot_store_version_reads_total") - reads0
    assert reads == 24, f"B read the version {reads:.0f} times in 24 requests with {changes} changes"
    wait_for(lambda: metric(b.url, "fewshot_store_notifications_total") - notes0 >= changes, "B notified")

    with ServiceProcess(tiny_bundle, db, tmp_path / "off.log", env={"FEWSHOT_STORE_NOTIFICATIONS": "0"}) as off:
        assert httpx.get(off.url + "/readyz", timeout=10).json()["notifications"] == "off"
        top_k(off.url, ws, key, 0)
        r0 = metric(off.url, "fewshot_store_version_reads_total")
        for i in range(10):
            top_k(off.url, ws, key, i)
        assert metric(off.url, "fewshot_store_version_reads_total") - r0 == 10
        c = teach(off.url, ws, key, "from-off", 77)  # a replica not listening still notifies the others
        assert c["id"] in classes_in(b.url, ws, key)

    notes1 = metric(b.url, "fewshot_store_notifications_total")
    with psycopg.connect(cluster.admin_url.replace("/postgres?", f"/{db.rsplit('/', 1)[1]}?"), autocommit=True) as conn:
        conn.execute("SELECT pg_notify('fewshot_changes', 'ws_' || lpad(to_hex(g), 16, '0') || ':' || g) "
                     "FROM generate_series(1, 10000) g")
        conn.execute("SELECT pg_notify('fewshot_changes', 'not ours ' || g) FROM generate_series(1, 100) g")
    wait_for(lambda: metric(b.url, "fewshot_store_notifications_total") - notes1 >= 10_000, "flood received")
    assert metric(b.url, "fewshot_store_listener_connected") == 1
    c = teach(a.url, ws, key, "after-flood", 88)
    assert c["id"] in classes_in(b.url, ws, key)


def test_postgres_restart_change_right_after_is_seen_on_the_other_replica(
        replicas: tuple[ServiceProcess, ServiceProcess], cluster: PgCluster, db: str) -> None:
    a, b = replicas
    ws, key = create_workspace(a.url, "replicas-d")
    teach(a.url, ws, key, "before", 0)
    classes_in(b.url, ws, key)
    connects = metric(b.url, "fewshot_store_listener_connects_total")
    bodies: list[str] = []
    cluster.stop("fast")
    try:
        r = httpx.post(f"{a.url}/workspaces/{ws}/classes", data={"label": "down"}, files=image_files(5, 3),
                       headers=auth(key), timeout=30)
        bodies.append(r.text)
        assert r.status_code == 503, r.text
    finally:
        cluster.start()
    deadline, made = time.monotonic() + WAIT_S, None
    while made is None and time.monotonic() < deadline:  # right after: the first write that goes through
        r = httpx.post(f"{a.url}/workspaces/{ws}/classes", data={"label": "after"}, files=image_files(6, 3),
                       headers=auth(key), timeout=30)
        bodies.append(r.text)
        if r.status_code == 201:
            made = r.json()
        else:
            assert r.status_code == 503, r.text
            time.sleep(0.05)
    assert made is not None, bodies[-1]
    deadline, seen = time.monotonic() + WAIT_S, None
    while seen is None and time.monotonic() < deadline:
        r = httpx.post(f"{b.url}/workspaces/{ws}/classify", data={"top_k": "100"}, files=image_files(9, 1),
                       headers=auth(key), timeout=30)
        bodies.append(r.text)
        if r.status_code == 200:
            seen = {c["class_id"] for c in r.json()["predictions"][0]["top_k"]}
        else:
            assert r.status_code == 503, r.text  # B's pool may still be reconnecting
    assert seen is not None and made["id"] in seen
    wait_for(lambda: metric(b.url, "fewshot_store_listener_connects_total") > connects, "B's listener back")
    wait_for(lambda: metric(b.url, "fewshot_store_listener_connected") == 1, "B listening")
    c = teach(a.url, ws, key, "later", 7)
    assert c["id"] in classes_in(b.url, ws, key)
    leaks = [x for x in bodies if cluster.secrets_in(x, db.rsplit("/", 1)[1])]
    assert not leaks, leaks[:2]


def test_dead_database_at_startup_is_a_clear_error_without_secrets(cluster: PgCluster, tiny_bundle: Path,
                                                                    tmp_path: Path) -> None:
    url = f"postgresql://{cluster.role}:{cluster.password}@127.0.0.1:{free_port()}/nowhere"
    svc = ServiceProcess(tiny_bundle, url, tmp_path / "dead.log")
    with pytest.raises(RuntimeError, match="exited"):
        svc.start(timeout_s=60)
    log = svc.log_tail(100_000)
    assert "cannot connect to PostgreSQL" in log and "check that the server runs" in log
    assert cluster.password not in log  # the URL is shown redacted: user:***@host
