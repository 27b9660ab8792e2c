"""Typed service settings: built in code (tests) or from FEWSHOT_* environment variables (`serve`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from fewshot.errors import ConfigError

ENV_PREFIX = "FEWSHOT_"
WEAK_ADMIN_KEYS = frozenset({"change-me", "changeme", "change_me", "admin", "secret", "password", "test", "fewshot"})
MIN_ADMIN_KEY_CHARS = 16


@dataclass(frozen=True)
class ServiceSettings:
    bundle_path: str  # the default model: a bundle folder, or NAME=PATH
    extra_bundles: tuple[str, ...] = ()  # more models (FEWSHOT_EXTRA_BUNDLES: separated by os.pathsep)
    db_url: str = "fewshot.db"  # sqlite path / sqlite:///path / postgresql://...
    admin_key: str = ""  # empty: creating workspaces over HTTP is disabled
    max_body_bytes: int = 16 * 1024 * 1024
    max_images_per_request: int = 64
    max_image_pixels: int = 25_000_000
    max_request_pixels: int = 100_000_000  # decoded pixels of all images of one request
    max_top_k: int = 100
    thumbnail_size: int = 64
    ort_threads: int = 1  # per request; concurrency comes from parallel requests (0: min(2, cores))
    torch_threads: int = 0  # process-wide torch threads (distance products); 0: leave as is; serve() uses 1
    malloc_arenas: int = 0  # process-wide glibc malloc arenas (memory back after bursts); 0: leave as is; serve() uses 2
    sync_interval_s: float = 0.0
    store_notifications: bool = True  # PostgreSQL: learn of other replicas' changes by LISTEN/NOTIFY, not per-call reads
    euclidean_threshold: float | None = None  # service-wide override of the bundle's calibration
    cosine_threshold: float | None = None
    static_dir: str = ""  # empty: the package's service/static
    metrics_public: bool = False  # False: /metrics needs the admin key (Prometheus: bearer_token)
    docs: bool = False  # True: /docs (Swagger UI from a CDN) and /redoc; /openapi.json is always served
    admin_failures_per_minute: int = 5  # failed key attempts per client address before 429 (see auth.KeyGuard)
    embed_slots: int = 0  # image chunks embedded at once, all models together (0: one per core)
    embed_chunk: int = 8  # images per model run
    embed_queue: int = 32  # chunks that may wait for a slot; beyond: 503 busy + Retry-After
    embed_wait_s: float = 5.0  # longest wait for a slot before 503 busy
    request_read_timeout_s: float = 30.0  # serve: a request's headers and body must arrive within this (408)
    admin_failures_per_minute_total: int = 20  # failed admin-key guesses from all addresses together before 429

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images_per_request", "max_image_pixels", "max_request_pixels", "max_top_k",
                     "thumbnail_size",
                     "admin_failures_per_minute", "admin_failures_per_minute_total", "embed_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"setting {name}={getattr(self, name)} must be >= 1")
        for name in ("embed_slots", "embed_queue", "embed_wait_s", "malloc_arenas"):
            if getattr(self, name) < 0:
                raise ConfigError(f"setting {name}={getattr(self, name)} must be >= 0")

    def admin_key_warnings(self) -> list[str]:
        """What is wrong with the admin key, for a loud warning at startup (not refused: a test or a
        private machine may want it)."""
        key = self.admin_key
        if not key:
            return []
        if key.lower() in WEAK_ADMIN_KEYS:
            return [f"the admin key is {key!r}, an example value anyone can guess: it opens every workspace and "
                    "creates new ones. Set FEWSHOT_ADMIN_KEY to a long random value, e.g. "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"]
        if len(key) < MIN_ADMIN_KEY_CHARS:
            return [f"the admin key has {len(key)} characters; use at least {MIN_ADMIN_KEY_CHARS} random ones "
                    "(it opens every workspace; failed guesses are only throttled)"]
        return []

    @property
    def model_specs(self) -> tuple[str, ...]:
        """Every served model's `PATH` or `NAME=PATH`, the default first."""
        return (self.bundle_path, *self.extra_bundles)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """FEWSHOT_BUNDLE_PATH, FEWSHOT_DB_URL, FEWSHOT_ADMIN_KEY, FEWSHOT_MAX_BODY_BYTES, ..."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "bundle_path" not in values:
            raise ConfigError("no bundle given; set FEWSHOT_BUNDLE_PATH or pass bundle_path")
        return cls(**values)


def _parse(name: str, type_name: str, raw: str) -> Any:
    try:
        if type_name.startswith("tuple"):
            return tuple(p for p in raw.split(os.pathsep) if p)
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a {type_name.split(' ')[0]}"
                          f"{' (use 1 or 0)' if type_name.startswith('bool') else ''}") from exc
    return raw
