"""The HTTP app's first import path, kept for callers (the CLI, scripts, `uvicorn --factory`): the
app lives in `fewshot.service.http` (schemas, auth policy, error mapping, routes by resource, the
assembly in `http.app`, `serve` in `http.serve`)."""

from __future__ import annotations

from fewshot.service.http.app import (
           STATIC_DIR,
           create_app,
           create_app_from_env,
           lifespan,
           open_state,
)
from fewshot.service.http.deps import ServiceState, get_settings, get_state
from fewshot.service.http.serve import proxy_trust, serve

__all__ = ["STATIC_DIR", "ServiceState", "create_app", "create_app_from_env", "get_settings", "get_state", "lifespan",
           "open_state", "proxy_trust", "serve"]
