"""Workspace API keys: random 256-bit tokens, stored as sha256 hex, compared in constant time.

A slow hash (pbkdf2) protects low-entropy passwords; these keys are 32 random bytes, so one
sha256 is already infeasible to invert and keeps authentication off the latency budget.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable

KEY_PREFIX = "fsk_"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_matches(key: str, key_hash: str) -> bool:
    """Constant-time comparison of `key`'s hash with a stored hash."""
    return hmac.compare_digest(hash_key(key).encode(), key_hash.encode())


def secret_matches(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets (the admin key)."""
    return bool(expected) and hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


class FailureThrottle:
    """Refuse a client after `limit` failed attempts within `window_s` seconds, until the oldest
    failure leaves the window (per client address; a success does not reset the count)."""

    def __init__(self, limit: int = 5, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000) -> None:
        self.limit, self.window_s, self.clock, self.max_clients = limit, window_s, clock, max_clients
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, []) if now - t < self.window_s]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again; 0 when it may try now."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if len(times) < self.limit:
                return 0
            return max(1, int(times[-self.limit] + self.window_s - now + 0.999))

    def failed(self, client: str) -> None:
        with self._lock:
            if len(self._failures) >= self.max_clients and client not in self._failures:
                self._failures.pop(next(iter(self._failures)))  # bounded memory under a spray of addresses
            self._recent(client, self.clock())
            self._failures.setdefault(client, []).append(self.clock())
