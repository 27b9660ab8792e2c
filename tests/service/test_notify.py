"""Change notifications between processes sharing a store: the version feed's rules (no database),
the recogniser skipping its per-call version read while notified, and PostgreSQL's LISTEN/NOTIFY
between two stores on a real server (pg_notify only on commit, listener loss and reconnect)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from postgres_server import fresh_database
from service_helpers import ToyEmbedder, class_images

from fewshot.service.notify import DELETED, VersionFeed, payload
from fewshot.service.recogniser import Recogniser
from fewshot.service.store import ConflictError, NewExample, PostgresStore, SQLiteStore, Store

WAIT_S = 30.0  # a deadline for conditions that normally hold within milliseconds, not a timing claim


def wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {WAIT_S:.0f} s: {what}")
        time.sleep(0.01)


# -- the feed's rules -----------------------------------------------------------------------------
def test_feed_trusts_only_a_connected_current_epoch_and_newest_version() -> None:
    f = VersionFeed()
    assert f.epoch() is None and not f.is_current("ws_a", 5, None)  # not listening: nothing known
    f.listening()
    e1 = f.epoch()
    assert e1 is not None and f.is_current("ws_a", 5, e1)  # nothing newer notified in this epoch
    assert not f.is_current("ws_a", 5, None)  # checked while the listener was away
    f.notified(payload("ws_a", 6))
    assert not f.is_current("ws_a", 5, e1) and f.is_current("ws_a", 6, e1) and f.is_current("ws_b", 0, e1)
    f.observe("ws_a", 4)  # an older version read late never lowers what is known
    assert f.known("ws_a") == 6
    f.lost()
    assert f.epoch() is None and not f.is_current("ws_a", 6, e1)  # lost: read per call
    f.listening()
    e2 = f.epoch()
    assert e2 != e1 and not f.is_current("ws_a", 6, e1)  # reconnected: every snapshot is stale once
    assert f.is_current("ws_a", 6, e2)
    f.notified(payload("ws_a", None))
    assert f.known("ws_a") == DELETED and not f.is_current("ws_a", 10**9, e2)
    for bad in ("", "no-colon", "ws_a:x", ":3", "ws_a:-2"):
        f.notified(bad)
    assert f.bad_payloads.value == 5 and f.notifications.value == 2 and f.connects.value == 2


def test_feed_bounded_forgetting_starts_a_new_epoch() -> None:
    """Past `max_known` workspaces the feed forgets them all, and no snapshot checked before is
    trusted (forgetting `ws_a:6` must not make a version-5 snapshot look current)."""
    f = VersionFeed(max_known=3)
    f.listening()
    e1 = f.epoch()
    f.notified(payload("ws_a", 6))
    for w in ("ws_b", "ws_c"):
        f.notified(payload(w, 1))
    assert f.epoch() == e1 and f.known("ws_a") == 6
    f.notified(payload("ws_d", 1))
    e2 = f.epoch()
    assert e2 != e1 and f.known("ws_a") is None and f.known("ws_d") == 1
    assert not f.is_current("ws_a", 5, e1) and f.is_current("ws_a", 6, e2)


# -- the recogniser with a feed (SQLite, feed driven by hand) ---------------------------------------
@dataclass
class Pair:
    """Two recognisers on one SQLite file, as two processes; `a` has a feed the test drives by
    hand (listening), `b` none; `ws`: a workspace made through `a`."""

    a: SQLiteStore
    b: SQLiteStore
    feed: VersionFeed
    ra: Recogniser
    rb: Recogniser
    ws: str


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    a, b = SQLiteStore(tmp_path / "s.db"), SQLiteStore(tmp_path / "s.db")
    a.feed = VersionFeed()
    a.feed.listening()
    ra = Recogniser(ToyEmbedder(), a)
    yield Pair(a, b, a.feed, ra, Recogniser(ToyEmbedder(), b), ra.create_workspace("w")[0].id)
    a.close()
    b.close()


def test_recogniser_skips_version_reads_while_notified(pair: Pair) -> None:
    a, b, ra, rb, ws = pair.a, pair.b, pair.ra, pair.rb, pair.ws
    ra.add_class(ws, "zero", class_images(0, 3))
    q = class_images(0, 4)[3:]
    ra.classify(ws, q)
    n0 = a.version_reads.value
    for _ in range(10):
        assert ra.classify(ws, q)[0].label == "zero"
    assert a.version_reads.value == n0  # our own change is applied locally: no read, no re-sync
    one = rb.add_class(ws, "one", class_images(1, 3))  # another process's change ...
    pair.feed.notified(payload(ws, one.version))  # ... and its notification
    assert ra.class_count(ws) == 2 and a.version_reads.value == n0 + 1  # re-read once
    assert ra.class_count(ws) == 2 and a.version_reads.value == n0 + 1
    pair.feed.lost()
    for i in range(3):
        ra.class_count(ws)
        assert a.version_reads.value == n0 + 2 + i  # listener away: one read per call, as without it
    b_before = b.version_reads.value
    rb.classify(ws, q)
    rb.classify(ws, q)
    assert b.version_reads.value == b_before + 2  # a store without a feed reads per call (SQLite: as always)


def test_change_while_listener_away_is_seen_after_reconnect(pair: Pair) -> None:
    """A snapshot checked in an earlier epoch is read once after a reconnect, so a change whose
    notification was lost with the connection is seen."""
    a, ra, rb, ws = pair.a, pair.ra, pair.rb, pair.ws
    ra.add_class(ws, "zero", class_images(0, 3))
    assert ra.class_count(ws) == 1
    pair.feed.lost()
    rb.add_class(ws, "one", class_images(1, 3))  # its notification never arrives
    pair.feed.listening()
    assert ra.class_count(ws) == 2
    n = a.version_reads.value
    assert ra.class_count(ws) == 2 and a.version_reads.value == n  # then trusted again


def test_own_changes_are_read_back_without_waiting_for_notifications(pair: Pair) -> None:
    """Read-your-writes on the process that made a change, also when another process's change
    came in between (the local apply is then skipped): the store's commits raise what the feed
    knows, so the stale snapshot is not trusted."""
    ra, rb, ws = pair.ra, pair.rb, pair.ws
    zero = ra.add_class(ws, "zero", class_images(0, 3))
    ra.class_count(ws)
    rb.add_class(ws, "one", class_images(1, 3))  # not notified to `a`
    two = ra.add_class(ws, "two", class_images(2, 3))  # memory not at version-1: not applied locally
    assert ra.class_count(ws) == 3
    ra.delete_class(ws, two.id)
    ra.rename_class(ws, zero.id, "nought")
    assert sorted(ra._memory(ws).protos.labels) == ["nought", "one"]


# -- PostgreSQL: LISTEN/NOTIFY between two stores ----------------------------------------------------
@pytest.fixture
def pg_pair(postgres_url: str) -> Iterator[tuple[PostgresStore, PostgresStore, str]]:
    url = fresh_database(postgres_url, f"n_{uuid.uuid4().hex[:12]}")
    a, b = PostgresStore(url, notifications=True), PostgresStore(url, notifications=True)
    try:
        yield a, b, url
    finally:
        a.close()
        b.close()


def _new_ws(store: Store) -> str:
    return store.create_workspace("n", uuid.uuid4().hex, {}, "bundle").id


def _ex(n: int = 1) -> list[NewExample]:
    import numpy as np

    return [NewExample(np.ones(4, np.float32), b"png") for _ in range(n)]


@pytest.mark.postgres
def test_postgres_notifies_committed_changes_only(pg_pair: tuple[PostgresStore, PostgresStore, str]) -> None:
    a, b, _ = pg_pair
    assert a.feed is not None and b.feed is not None
    wait_for(lambda: a.feed.connected and b.feed.connected, "both listeners connected")  # type: ignore[union-attr]
    ws = _new_ws(a)
    rec, _ = a.add_class(ws, "x", _ex())
    wait_for(lambda: b.feed.known(ws) == rec.version, "B notified of A's class")  # type: ignore[union-attr]
    n = b.feed.notifications.value
    with pytest.raises(ConflictError):
        a.add_class(ws, "x", _ex())  # refused: rolled back with its pg_notify
    rec2, _ = a.add_examples(ws, rec.id, _ex(2))
    assert rec2.version == rec.version + 1  # the refused change consumed no version
    wait_for(lambda: b.feed.known(ws) == rec2.version, "B notified of A's addition")  # type: ignore[union-attr]
    assert b.feed.notifications.value == n + 1  # nothing from the rolled-back change
    a.rename_class(ws, rec.id, "y")
    a.delete_class(ws, rec.id)
    a.update_workspace_settings(ws, {"metric": "cosine"})
    wait_for(lambda: b.feed.known(ws) == rec2.version + 3, "B notified of rename, delete, settings")  # type: ignore[union-attr]
    a.delete_workspace(ws)
    wait_for(lambda: b.feed.known(ws) == DELETED, "B notified of the deletion")  # type: ignore[union-attr]


@pytest.mark.postgres
def test_postgres_listener_reconnects_after_its_connection_is_killed(
        pg_pair: tuple[PostgresStore, PostgresStore, str], postgres_url: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """The listener's backend is terminated (as in a server restart): the feed says so (reads per
    call), the listener LISTENs again in a new epoch, and notifications flow again. Its log lines
    name no URL."""
    import psycopg

    a, b, url = pg_pair
    assert a.feed is not None and b.feed is not None
    wait_for(lambda: b.feed.connected, "B listening")  # type: ignore[union-attr]
    e1 = b.feed.epoch()
    ws = _new_ws(a)
    caplog.set_level(logging.WARNING, logger="fewshot.service.notify")
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                               "'fewshot-listener' AND datname = %s", (url.rsplit("/", 1)[1],)).fetchall()
    assert len(killed) == 2
    wait_for(lambda: b.feed.connects.value >= 2 and b.feed.connected, "B listening again")  # type: ignore[union-attr]
    assert b.feed.epoch() != e1 and not b.feed.is_current(ws, 10**6, e1)
    rec, _ = a.add_class(ws, "after", _ex())
    wait_for(lambda: b.feed.known(ws) == rec.version, "B notified after reconnecting")  # type: ignore[union-attr]
    assert any("listener connection lost" in r.getMessage() for r in caplog.records)
    host = url.split("@", 1)[1].split("/", 1)[0]
    assert not [r.getMessage() for r in caplog.records if host in r.getMessage() or "postgresql://" in r.getMessage()]


@pytest.mark.postgres
def test_postgres_close_stops_the_listener(postgres_url: str) -> None:
    url = fresh_database(postgres_url, f"n_{uuid.uuid4().hex[:12]}")
    s = PostgresStore(url, notifications=True)
    assert s.feed is not None and s._listener is not None
    wait_for(lambda: s.feed.connected, "listening")  # type: ignore[union-attr]
    s.close()
    assert not s._listener.alive and not s.feed.connected
    off = PostgresStore(url)  # notifications off: no listener, no feed (but its changes still notify)
    try:
        assert off.feed is None and off._listener is None
    finally:
        off.close()
