"""The backend contract: connections, transactions, dialect and failure mapping that
`SQLiteStore` and `PostgresStore` supply, and the guard that turns their failures into
`StoreUnavailable` (a 503 whose message holds no URL or credentials)."""

from __future__ import annotations

import functools
import logging
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import unquote

from fewshot.io import redact_url
from fewshot.service.notify import Tally, VersionFeed
from fewshot.service.store.records import InvalidInput, StoreError, StoreUnavailable

log = logging.getLogger("fewshot.service.store")
S = TypeVar("S", bound="StoreBackend")
P = ParamSpec("P")
R = TypeVar("R")


def scrub_secrets(text: str, url: str) -> str:
    """`text` (a driver's error message) with the password of `url` replaced by ***, as written and
    percent-decoded, and the URL itself redacted."""
    _, sep, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0] if sep else ""
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
    found += re.findall(r"(?i)password=([^&#\s]+)", url)
    text = text.replace(url, redact_url(url))
    for secret in sorted({v for p in found for v in (p, unquote(p)) if p}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _check_params(params: Sequence[Any]) -> None:
    for p in params:
        if isinstance(p, str) and "\x00" in p:
            raise InvalidInput(f"text {p[:40]!r} contains a NUL character (\\x00); remove control characters")


class _CommitUnknown(Exception):
    """The connection failed during COMMIT: the change may or may not be stored."""


def _guarded(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Map backend failures to StoreUnavailable; retry once after a dropped connection."""

    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in (1, 2):
            try:
                return method(self, *args, **kwargs)
            except StoreError:
                raise
            except _CommitUnknown as exc:
                log.warning("store %s: connection lost during COMMIT (%s)", self.safe_url,
                            scrub_secrets(str(exc.__cause__), self.url))
                raise StoreUnavailable("the database connection was lost while saving; the change may not "
                                       "have been applied: check before retrying", retry_after_s=0) from exc
            except Exception as exc:
                kind = self._failure_kind(exc)
                if kind is None:
                    raise
                if kind == "connection" and attempt == 1:
                    log.warning("store %s: %s; retrying once", self.safe_url, type(exc).__name__)
                    continue
                log.error("store %s unavailable: %s: %s", self.safe_url, type(exc).__name__,
                          scrub_secrets(str(exc), self.url))
                raise StoreUnavailable(self._unavailable_message(exc)) from exc
        raise AssertionError("unreachable")

    return wrapper

class StoreBackend(ABC):
    """What each backend supplies: connections, transactions, dialect and failure kinds.
    `fewshot.service.store.operations.Store` holds the operations, written once for both."""

    url: str
    feed: VersionFeed | None = None  # PostgreSQL with notifications: the versions this process knows of
    version_reads: Tally  # calls of `workspace_version` (the per-call change check)

    # -- backend hooks ---------------------------------------------------------------------
    @abstractmethod
    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction; yields an object with `.execute(sql, params)` -> cursor."""

    @abstractmethod
    def _connect(self) -> Any:
        """A new connection (each thread gets its own, see `_conn`)."""

    @abstractmethod
    def _is_unique_violation(self, exc: BaseException) -> bool: ...

    @abstractmethod
    @contextmanager
    def _snapshot(self) -> Iterator[Any]:
        """A read-only transaction: every read inside sees the same committed state."""

    def _changed(self, c: Any, workspace_id: str, version: int | None) -> None:
        """Inside a change's transaction: the workspace reached `version` (None: deleted).
        Nothing for SQLite (one process); PostgreSQL tells the other processes."""
        return None

    def _observe(self, workspace_id: str, version: int) -> None:
        """The store is (at least) at `version` of the workspace: committed by us, or just read."""
        if self.feed is not None:
            self.feed.observe(workspace_id, version)

    def _failure_kind(self, exc: BaseException) -> str | None:
        """"connection" (retry once), "unavailable" (503 now) or None (a bug: let it raise)."""
        return None

    def _unavailable_message(self, exc: BaseException) -> str:
        return "the database is unavailable; retry shortly"

    @property
    def safe_url(self) -> str:
        return redact_url(self.url)

    # -- connections (SQLite: one per thread; PostgreSQL overrides with a pool) ------------------
    def _init_connections(self) -> None:
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(conn, "closed", False):
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A connection for one read statement."""
        yield self._conn()

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def _sql(self, sql: str) -> str:
        return sql

    def _exec(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        _check_params(params)
        return conn.execute(self._sql(sql), tuple(params))

    # -- model identity ----------------------------------------------------------------------
    @abstractmethod
    def _columns(self, c: Any, table: str) -> set[str]:
        """The column names of `table`."""
