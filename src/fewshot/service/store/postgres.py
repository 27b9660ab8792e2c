"""PostgreSQL backend: psycopg 3 through a psycopg_pool pool, with change notifications for the
other processes sharing the database (`fewshot.service.notify`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from fewshot.service.notify import CHANNEL, PgListener, Tally, VersionFeed, payload
from fewshot.service.store.backend import _CommitUnknown, scrub_secrets
from fewshot.service.store.operations import Store
from fewshot.service.store.records import StoreError
from fewshot.service.store.schema import statements


class PostgresStore(Store):
    """PostgreSQL through psycopg 3 and a psycopg_pool connection pool.

    Connections are checked on checkout (a dead one, e.g. after a server restart, is replaced,
    not handed out); reconnection backs off at most `reconnect_s` before the pool gives up and
    grows again on the next request, so service recovers within seconds of the server's return.
    A request waits at most `timeout_s` for a connection, then gets `StoreUnavailable` (503).

    Every change notifies `notify.CHANNEL` in its transaction; with `notifications`, a listener
    thread (one more connection, outside the pool) keeps `feed` up to date (`fewshot.service.notify`).
    """

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 16, timeout_s: float = 3.0,
                 reconnect_s: float = 3.0, notifications: bool = False) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.url = url
        self._psycopg = psycopg
        self.version_reads = Tally()
        self._listener: PgListener | None = None
        try:
            self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size, timeout=timeout_s,
                                        reconnect_timeout=reconnect_s, kwargs={"autocommit": True},
                                        check=ConnectionPool.check_connection, open=False, name="fewshot")
        except Exception as exc:  # a malformed URL: the driver's message may quote it
            raise StoreError(f"cannot use PostgreSQL URL {self.safe_url}: {type(exc).__name__}: "
                             f"{scrub_secrets(str(exc), url)}") from None
        try:
            self._pool.open(wait=True, timeout=timeout_s + reconnect_s)
        except Exception as exc:
            self._pool.close()
            raise StoreError(f"cannot connect to PostgreSQL at {self.safe_url} ({type(exc).__name__}); "
                             "check that the server runs and the URL, user and password") from None
        with self._tx() as c:
            c.execute("SELECT pg_advisory_xact_lock(4242001)")  # concurrent first starts create once
            for stmt in statements("BYTEA"):
                c.execute(stmt)
            self._migrate(c)
        if notifications:
            self.feed = VersionFeed()
            self._listener = PgListener(url, self.feed).start()

    def _connect(self) -> Any:
        raise AssertionError("PostgresStore takes connections from its pool")

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self._pool.close()

    def _changed(self, c: Any, workspace_id: str, version: int | None) -> None:
        # delivered to every listener of the database on COMMIT, never on ROLLBACK
        self._exec(c, "SELECT pg_notify(?, ?)", (CHANNEL, payload(workspace_id, version)))

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Any]:
        with self._pool.connection() as conn:
            conn.execute(begin)
            try:
                yield conn
            except BaseException:
                if not conn.closed:
                    with suppress(self._psycopg.Error):  # a broken connection is discarded by the pool
                        conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except self._psycopg.OperationalError as exc:
                raise _CommitUnknown() from exc

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._transaction("BEGIN") as conn:
            yield conn

    @contextmanager
    def _snapshot(self) -> Iterator[Any]:
        with self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as conn:
            yield conn

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)

    def _columns(self, c: Any, table: str) -> set[str]:
        rows = self._exec(c, "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                          "AND table_name = ?", (table,)).fetchall()
        return {r[0] for r in rows}

    def _failure_kind(self, exc: BaseException) -> str | None:
        from psycopg_pool import PoolTimeout

        if isinstance(exc, PoolTimeout):
            return "unavailable"
        if isinstance(exc, self._psycopg.OperationalError | self._psycopg.InterfaceError):
            return "connection"  # server restarted (AdminShutdown), connection dropped
        return None

    def _unavailable_message(self, exc: BaseException) -> str:
        return "the database is unavailable or overloaded (no PostgreSQL connection in time); retry shortly"
