"""Auth policy: who may call what. Workspace routes take `Authorization: Bearer <key>` (keys are
accepted in no other place, and a key-like query parameter is refused so it never reaches an access
log); the admin key opens every route. Failed attempts are throttled (`fewshot.service.auth.KeyGuard`:
admin-key guesses per address and service-wide, mistyped workspace keys apart; 429 + Retry-After).
Keys, their hashes and the throttle are `fewshot.service.auth`; this module applies them to requests.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi import Path as PathParam

from fewshot.service.auth import KeyGuard, hash_key, key_matches, secret_matches
from fewshot.service.http.deps import SettingsDep, StateDep
from fewshot.service.http.errors import ApiError, short
from fewshot.service.models import ServedModel
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import is_id

SENSITIVE_QUERY = ("api_key", "apikey", "key", "token", "access_token", "admin_key", "password")


def presented_key(request: Request) -> str:
    """The bearer key of `Authorization`; keys in the query string are refused (they get logged)."""
    leaked = [k for k in request.query_params if k.lower().replace("-", "_") in SENSITIVE_QUERY]
    if leaked:
        raise ApiError(400, "key_in_url", f"query parameter {leaked[0]!r} looks like a key; keys in URLs end up "
                       "in logs and browser history: send 'Authorization: Bearer <key>' instead (and rotate it)")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ""


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def throttled(request: Request, key: str, what: str) -> None:
    """429 + Retry-After while failed attempts of `key`'s kind are over their limit (`KeyGuard`)."""
    guard: KeyGuard = request.app.state.key_guard
    wait, scope = guard.retry_after(client_address(request), key)
    if wait:
        where = "from this address" if scope == "per-address" else "from many addresses (a service-wide limit)"
        raise ApiError(429, "too_many_attempts", f"too many failed {what} attempts {where}; retry in {wait} s",
                       headers={"Retry-After": str(wait)})


def check_admin(request: Request, settings: ServiceSettings) -> None:
    """The admin key, or 401/403/429: failed attempts are throttled (`KeyGuard`)."""
    key = presented_key(request)
    if not settings.admin_key:
        raise ApiError(403, "forbidden", "admin routes (workspace creation, /metrics) are disabled: set "
                       "FEWSHOT_ADMIN_KEY on the server (or FEWSHOT_METRICS_PUBLIC=1 for /metrics)")
    throttled(request, key, "admin-key")
    if not key:
        raise ApiError(401, "unauthorized", "missing admin key; send 'Authorization: Bearer <admin key>'")
    guard: KeyGuard = request.app.state.key_guard
    if not secret_matches(key, settings.admin_key):
        guard.failed(client_address(request), key)
        raise ApiError(401, "unauthorized", "wrong admin key" + ("" if guard.is_admin_guess(key) else
                       " (this is a workspace key: it opens its workspace's routes only)"))
    guard.admin_succeeded(client_address(request))


def require_admin(request: Request, settings: SettingsDep) -> None:
    check_admin(request, settings)


def workspace_access(request: Request, ws: Annotated[str, PathParam(max_length=64)],
                     state: StateDep, settings: SettingsDep) -> str:
    """The workspace id, if the presented key opens it: no/unknown key 401; a valid key of another
    workspace: 403 if `ws` exists, 404 if not; the admin key: 404 for a workspace that does not exist."""
    key = presented_key(request)
    if not key:
        raise ApiError(401, "unauthorized", "missing API key; send 'Authorization: Bearer <workspace key>'")
    record = state.views.current(ws) if is_id(ws, "ws") else None  # ids are checked before any query
    request.state.workspace = record
    if record is not None and key_matches(key, record.key_hash):
        return ws
    missing = ApiError(404, "not_found", f"workspace {short(ws)!r} does not exist; list yours with the key it came with")
    throttled(request, key, "key")  # the admin key opens every route: guesses count everywhere
    guard: KeyGuard = request.app.state.key_guard
    if secret_matches(key, settings.admin_key):
        guard.admin_succeeded(client_address(request))
        if record is None:
            raise missing
        return ws
    own = state.store.workspace_by_key_hash(hash_key(key))
    if own is not None:
        if record is None:
            raise missing
        raise ApiError(403, "forbidden", f"this API key opens workspace {own.id!r}, not {short(ws)!r}")
    guard.failed(client_address(request), key)
    raise ApiError(401, "unauthorized", "wrong API key for this workspace")


WorkspaceDep = Annotated[str, Depends(workspace_access)]


async def workspace_model(request: Request, ws: WorkspaceDep, state: StateDep) -> ServedModel:
    """The model the (authorised) workspace was created with."""
    return state.models.of_workspace(request.state.workspace)


ModelDep = Annotated[ServedModel, Depends(workspace_model)]
