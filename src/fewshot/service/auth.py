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


def looks_like_workspace_key(key: str) -> bool:
    """Whether `key` is shaped like a workspace key (what `new_api_key` makes)."""
    return key.startswith(KEY_PREFIX)


class KeyGuard:
    """Throttles failed key attempts without letting users lock the admin out.

    * A wrong key shaped like a workspace key (`fsk_...`) cannot be the admin key when the admin key
      has another shape: it counts only against `workspace` (per address), so a user's mistyped
      workspace keys never lock the admin key out, even from the same address.
    * Any other wrong key is an admin-key guess: it counts per address (`limit` a window) *and*
      globally (`total_limit` a window, every address together), so rotating source addresses gets
      at most `total_limit` guesses a window, not `limit` per address.
    * While the global budget is spent, only addresses that presented the right admin key in the
      last `trusted_s` seconds may still try the admin key (each under its own per-address limit):
      an attacker spraying addresses cannot lock out an admin who has used the key before.

    A refused attempt is refused whatever the key (the right key too): otherwise the answer to a
    throttled guess would still tell right from wrong.
    """

    def __init__(self, admin_key: str, *, limit: int = 5, total_limit: int = 20, window_s: float = 60.0,
                 trusted_s: float = 24 * 3600.0, clock: Callable[[], float] = time.monotonic,
                 max_trusted: int = 1000) -> None:
        self.admin_key_is_workspace_shaped = looks_like_workspace_key(admin_key)
        self.admin = FailureThrottle(limit, window_s, clock)
        self.workspace = FailureThrottle(limit, window_s, clock)
        self.total = FailureThrottle(total_limit, window_s, clock, max_clients=1)
        self.trusted_s, self.clock, self.max_trusted = trusted_s, clock, max_trusted
        self._trusted: dict[str, float] = {}
        self._lock = threading.Lock()

    def is_admin_guess(self, key: str) -> bool:
        """Whether a wrong `key` is a guess at the admin key (else a mistyped workspace key)."""
        return self.admin_key_is_workspace_shaped or not looks_like_workspace_key(key)

    def _trusted_now(self, client: str) -> bool:
        with self._lock:
            at = self._trusted.get(client)
            return at is not None and self.clock() - at < self.trusted_s

    def retry_after(self, client: str, key: str) -> tuple[int, str]:
        """(seconds until `client` may try `key`'s kind of key again, which limit), (0, "") when it may now."""
        if not self.is_admin_guess(key):
            wait = self.workspace.retry_after(client)
            return (wait, "per-address") if wait else (0, "")
        wait = self.admin.retry_after(client)
        if wait:
            return wait, "per-address"
        if not self._trusted_now(client):
            wait = self.total.retry_after("*")
            if wait:
                return wait, "service-wide"
        return 0, ""

    def failed(self, client: str, key: str) -> None:
        if self.is_admin_guess(key):
            self.admin.failed(client)
            self.total.failed("*")
        else:
            self.workspace.failed(client)

    def admin_succeeded(self, client: str) -> None:
        """`client` presented the right admin key: it may keep trying while others spray guesses."""
        with self._lock:
            self._trusted.pop(client, None)
            if len(self._trusted) >= self.max_trusted:
                self._trusted.pop(next(iter(self._trusted)))
            self._trusted[client] = self.clock()
