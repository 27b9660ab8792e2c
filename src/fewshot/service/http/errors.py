"""Error mapping: every refusal the service answers, as `{"error": {"code", "message"}}` with its
HTTP status, in one place. The core raises kinds without a status (`fewshot.service.errors`, the
store's errors, the cost bounds' `ServiceBusy` / `OverBudget`); `status_of` maps them here, and
`ApiError` is the HTTP layer's own refusal (auth, request limits)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fewshot.errors import FewshotError
from fewshot.service.costs import OverBudget
from fewshot.service.embedding import ServiceBusy
from fewshot.service.errors import RequestError, TooLarge, Unprocessable, UnsupportedMedia
from fewshot.service.forms import FormError
from fewshot.service.store import (
    ConflictError,
    InvalidInput,
    NotFoundError,
    StoreError,
    StoreUnavailable,
)

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
                422: "invalid_request", 500: "internal_error", 503: "not_ready"}

# (kind, status, code; None: the error's own `code`), the first match wins (subclasses first)
_STATUS_OF: tuple[tuple[type[FewshotError], int, str | None], ...] = (
    (TooLarge, 413, None),
    (UnsupportedMedia, 415, None),
    (Unprocessable, 422, None),
    (RequestError, 400, None),
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (ServiceBusy, 503, "busy"),
    (OverBudget, 429, "over_budget"),
    (StoreUnavailable, 503, "store_unavailable"),  # a server fault; the message holds no URL or credentials
    (InvalidInput, 400, "invalid_input"),
    (StoreError, 400, "store_error"),
)


class ApiError(Exception):
    """A refusal of the HTTP layer itself, with its status, code and headers (e.g. Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def short(text: str, n: int = 80) -> str:
    """User-given text echoed in an error, cut to `n` characters."""
    return text if len(text) <= n else text[:n] + "..."


def status_of(exc: FewshotError) -> tuple[int, str]:
    """The HTTP status and error code of one of the core's errors (any other: 400 invalid_argument)."""
    for kind, status, code in _STATUS_OF:
        if isinstance(exc, kind):
            return status, code or str(getattr(exc, "code", "error"))
    return 400, "invalid_argument"


def retry_after(exc: FewshotError) -> dict[str, str] | None:
    """The Retry-After header of a "busy, retry" error; none for a store failure at COMMIT (retry_after_s
    0: the outcome is unknown, an automatic retry could apply the change twice) or any other error."""
    wait = getattr(exc, "retry_after_s", None)
    if wait is None or (isinstance(exc, StoreUnavailable) and not wait):
        return None
    return {"Retry-After": str(wait)}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    response = JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
    response.headers.update(headers or {})
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = exc.code if isinstance(exc, FormError) else STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(FewshotError)
    async def _fewshot(_: Request, exc: FewshotError) -> JSONResponse:
        status, code = status_of(exc)
        return error_response(status, code, str(exc), retry_after(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); the request was not applied")
