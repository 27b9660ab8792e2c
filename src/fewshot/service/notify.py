"""Change notifications between service processes (replicas) sharing one PostgreSQL store.

Every committed change to a workspace sends `pg_notify('fewshot_changes', '<workspace_id>:<version>')`
inside its transaction, so it is delivered only on commit (`<workspace_id>:deleted` when the
workspace is deleted). Each process keeps one dedicated connection that LISTENs in a daemon thread
(`PgListener`) and records in a `VersionFeed` the newest version it knows of each workspace, and an
`epoch` that starts anew on every (re)connect.

The recogniser trusts a workspace's in-memory snapshot without reading the store only when
  * the listener is connected,
  * the snapshot was checked against the store after the current epoch began (the epoch is taken
    before that read, so any later commit is notified to this epoch; after a reconnect every
    snapshot is read once, so a change made while the listener was away is still seen), and
  * the snapshot's version >= the newest version known for its workspace.
Otherwise it reads the version as before (one indexed read per call). Versions the store learns
without a notification also raise the known version: the version every HTTP request reads for its
key check (`fewshot.service.views`: one read per request, with or without notifications, so a change
acknowledged by one replica is seen by the next request on another even before its notification
arrives; the classify path then reads nothing more), and the store's own commits. Notifications
spare the reads of the other paths (registering images, insight, export).

Connection strings and passwords never reach a log line: failures are logged by exception type.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CHANNEL = "fewshot_changes"
DELETED = 1 << 62  # the known version of a deleted workspace: every snapshot of it is stale
log = logging.getLogger("fewshot.service.notify")


class Tally:
    """A thread-safe counter."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def inc(self, n: int = 1) -> None:
        with self._lock:
            self._n += n

    @property
    def value(self) -> int:
        return self._n


def payload(workspace_id: str, version: int | None) -> str:
    """The notification text of a change: `<workspace_id>:<version>`, or `:deleted`."""
    return f"{workspace_id}:{'deleted' if version is None else version}"


class VersionFeed:
    """What this process knows of the store's workspace versions beyond its snapshots. At most
    `max_known` workspaces are remembered: past that (a flood of notifications for workspaces this
    process never serves) it forgets them all and begins a new epoch, so every snapshot is read
    once more rather than trusted without what was forgotten."""

    def __init__(self, max_known: int = 100_000) -> None:
        self.max_known = max_known
        self._lock = threading.Lock()
        self._latest: dict[str, int] = {}
        self._epoch = 0
        self._connected = False
        self.notifications = Tally()  # received from the listener
        self.connects = Tally()  # successful LISTENs (the first and every reconnect)
        self.bad_payloads = Tally()

    # -- the listener's events --------------------------------------------------------------------
    def listening(self) -> None:
        """LISTEN is active: a new epoch begins (snapshots checked before it are stale once)."""
        with self._lock:
            self._epoch += 1
            self._connected = True
        self.connects.inc()

    def lost(self) -> None:
        """The listener connection is gone: nothing is known until it listens again."""
        with self._lock:
            self._connected = False

    def notified(self, text: str) -> None:
        ws, _, v = text.rpartition(":")
        try:
            version = DELETED if v == "deleted" else int(v)
        except ValueError:
            version = -1
        if not ws or version < 0:
            self.bad_payloads.inc()
            return
        self.notifications.inc()
        self.observe(ws, version)

    def observe(self, workspace_id: str, version: int) -> None:
        """Workspace `workspace_id` has reached (at least) `version` in the store."""
        with self._lock:
            if version > self._latest.get(workspace_id, -1):
                if workspace_id not in self._latest and len(self._latest) >= self.max_known:
                    self._latest.clear()
                    self._epoch += 1
                self._latest[workspace_id] = version

    # -- the recogniser's questions -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    def epoch(self) -> int | None:
        """The current epoch, or None while the listener is not connected. Take it *before*
        reading a version from the store, and keep it with the snapshot."""
        with self._lock:
            return self._epoch if self._connected else None

    def is_current(self, workspace_id: str, version: int, epoch: int | None) -> bool:
        """Whether a snapshot at `version`, checked against the store in `epoch`, is known to be
        current without reading the store."""
        with self._lock:
            return (self._connected and epoch == self._epoch
                    and version >= self._latest.get(workspace_id, -1))

    def known(self, workspace_id: str) -> int | None:
        with self._lock:
            return self._latest.get(workspace_id)


class PgListener:
    """One dedicated PostgreSQL connection that LISTENs on `channel` in a daemon thread and feeds
    `feed`; reconnects with backoff, pings every `heartbeat_s` when idle (TCP keepalives catch a
    silent network drop), stops within about `poll_s` of `stop()`."""

    def __init__(self, url: str, feed: VersionFeed, *, channel: str = CHANNEL, poll_s: float = 0.5,
                 heartbeat_s: float = 5.0, retry_s: tuple[float, float] = (0.2, 5.0),
                 connect_timeout_s: int = 3) -> None:
        self.url, self.feed, self.channel = url, feed, channel
        self.poll_s, self.heartbeat_s, self.retry_s = poll_s, heartbeat_s, retry_s
        self.connect_timeout_s = connect_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PgListener:
        self._thread = threading.Thread(target=self._run, name="fewshot-store-listener", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.feed.lost()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s,
                               keepalives=1, keepalives_idle=10, keepalives_interval=3, keepalives_count=3,
                               application_name="fewshot-listener")
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        delay, was_up, failures = self.retry_s[0], False, 0
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._connect()
                self.feed.listening()
                if was_up or failures:
                    log.warning("store notifications: listening again; every snapshot is checked once")
                was_up, failures, delay = True, 0, self.retry_s[0]
                self._listen(conn)
            except Exception as exc:  # psycopg.Error and anything else: never let the thread die
                self.feed.lost()
                failures += 1
                if was_up or failures == 1:
                    log.warning("store notifications: listener connection %s (%s); versions are read per request "
                                "until it reconnects", "lost" if was_up else "failed", type(exc).__name__)
                was_up = False
            finally:
                self.feed.lost()
                if conn is not None:
                    with suppress(Exception):
                        conn.close()
            self._stop.wait(delay)
            delay = min(delay * 2, self.retry_s[1])

    def _listen(self, conn: Any) -> None:
        """Feed notifications until stopped (returns) or the connection fails (raises)."""
        beat = time.monotonic()
        while not self._stop.is_set():
            got = 0
            for n in conn.notifies(timeout=self.poll_s):
                if n.channel == self.channel:
                    self.feed.notified(n.payload)
                got += 1
                if self._stop.is_set():
                    return
            if got:
                beat = time.monotonic()
            elif time.monotonic() - beat >= self.heartbeat_s:
                conn.execute("SELECT 1")
                beat = time.monotonic()


class StoreCollector:
    """Prometheus collector of the store's version reads and notifications (no per-workspace
    labels): `fewshot_store_version_reads_total`, `fewshot_store_notifications_total`,
    `fewshot_store_listener_connected`, `fewshot_store_listener_connects_total`."""

    def __init__(self, store_of: Callable[[], Any]) -> None:
        self.store_of = store_of

    def collect(self) -> Iterator[Any]:
        store = self.store_of()
        if store is None:
            return
        yield CounterMetricFamily("fewshot_store_version_reads", "Workspace version reads (the per-call change check)",
                                  value=store.version_reads.value)
        feed: VersionFeed | None = store.feed
        yield GaugeMetricFamily("fewshot_store_notifications_enabled", "1: changes come by PostgreSQL LISTEN/NOTIFY",
                                value=int(feed is not None))
        if feed is None:
            return
        yield CounterMetricFamily("fewshot_store_notifications", "Change notifications received",
                                  value=feed.notifications.value)
        yield GaugeMetricFamily("fewshot_store_listener_connected", "1: the notification listener is connected",
                                value=int(feed.connected))
        yield CounterMetricFamily("fewshot_store_listener_connects", "LISTENs begun (first connect and reconnects)",
                                  value=feed.connects.value)
