"""SQLite backend: one file, WAL mode, one connection per thread, owner-only permissions."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fewshot.service.notify import Tally
from fewshot.service.store.operations import Store
from fewshot.service.store.schema import statements


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (0600) if it does not exist: it holds key
    hashes, embeddings and thumbnails. SQLite gives its -wal and -shm files the same mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SQLiteStore(Store):
    """SQLite in WAL mode; one connection per thread; writes take the lock up front (BEGIN IMMEDIATE)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(self.path)
        self._write_lock = threading.Lock()
        self.version_reads = Tally()
        self._init_connections()
        with self._tx() as c:
            for stmt in statements("BLOB"):
                c.execute(stmt)
            self._migrate(c)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: atomic and safe against process kills
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute(begin)
        try:
            yield conn
            conn.execute("COMMIT")  # a failed COMMIT (disk full) leaves the transaction open
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # Writers of this process queue on a lock rather than in SQLite's busy handler, which
        # sleeps and retries (seconds of tail latency under 32 concurrent writers); other
        # processes still meet BEGIN IMMEDIATE's lock and busy_timeout.
        with self._write_lock, self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        with self._transaction("BEGIN DEFERRED") as conn:  # WAL: reads see one snapshot
            yield conn

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE" in str(exc)

    def _columns(self, c: Any, table: str) -> set[str]:
        return {r[1] for r in c.execute(f"PRAGMA table_info({table})").fetchall()}

    def _failure_kind(self, exc: BaseException) -> str | None:
        # disk full, read-only file system, locked past busy_timeout, I/O error: not the client's fault
        return "unavailable" if isinstance(exc, sqlite3.OperationalError) else None

    def _unavailable_message(self, exc: BaseException) -> str:
        text = str(exc).lower()
        if "full" in text:
            return "the database disk is full; nothing was saved: free space on the server, then retry"
        if "readonly" in text or "read-only" in text:
            return "the database is read-only; nothing was saved: the operator must make it writable"
        if "locked" in text or "busy" in text:
            return "the database is busy; nothing was saved: retry shortly"
        return "the database failed; nothing was saved: retry shortly"

