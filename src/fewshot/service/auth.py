"""Workspace API keys: random 256-bit tokens, stored as sha256 hex, compared in constant time.

A slow hash (pbkdf2) protects low-entropy passwords; these keys are 32 random bytes, so one
sha256 is already infeasible to invert and keeps authentication off the latency budget.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

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
