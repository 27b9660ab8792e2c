"""ASGI middleware: request-body limit (413 before reading, and while streaming), Prometheus
metrics and a `Server-Timing` header with the server-side duration; an access-log filter that
never writes a query string's values."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class HttpMiddleware:
    """An ASGI middleware that handles HTTP requests in `http` and passes everything else
    (lifespan, websockets) through untouched."""

    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class BodyLimitMiddleware(HttpMiddleware):
    """Refuse bodies over `max_bytes()`: by Content-Length before reading anything, else by counting
    while the body streams in (chunked uploads), so a 100 MB request never sits in memory."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_bytes()
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_error(send, 400, "bad_request", f"Content-Length {declared.decode(errors='replace')!r} is not a number")
                return
            if int(declared) > limit:
                await send_error(send, 413, "body_too_large", f"request body of {int(declared):,} bytes exceeds "
                                 f"the limit of {limit:,}; send fewer or smaller images per request")
                return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI re-raises HTTPException from body reading unchanged
                    raise HTTPException(413, f"request body exceeds the limit of {limit:,} bytes; "
                                        "send fewer or smaller images per request")
            return message

        await self.app(scope, counted_receive, send)


# The web page loads its scripts and styles from this origin only (no inline script or style
# attribute in index.html); thumbnails are data: and blob: URLs, the camera a MediaStream.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "media-src 'self' blob: mediastream:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"))


class SecurityHeadersMiddleware(HttpMiddleware):
    """nosniff, no framing and no referrer on every response; the page's Content-Security-Policy on
    every response but `csp_exempt` paths (/docs and /redoc, when on, load Swagger UI from a CDN)."""

    def __init__(self, app: ASGIApp, csp_exempt: tuple[str, ...] = ()) -> None:
        self.app, self.csp_exempt = app, csp_exempt

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        extra = list(SECURITY_HEADERS)
        if not scope["path"].startswith(self.csp_exempt) or not self.csp_exempt:
            extra.append((b"content-security-policy", PAGE_CSP.encode()))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in extra if k not in have)]}
            await send(message)

        await self.app(scope, receive, with_headers)


class Metrics:
    """Per-app registry, so several apps (tests) never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fewshot_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("fewshot_http_request_duration_seconds", "Server-side request duration",
                                 ["method", "route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.images = Counter("fewshot_images_embedded_total",
                              "Images embedded (a taught image counts once per example view)", ["operation"],
                              registry=self.registry)


class MetricsMiddleware(HttpMiddleware):
    """Counts and times every request by route template; adds `Server-Timing: app;dur=<ms>`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                dur_ms = (time.perf_counter() - start) * 1000
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"server-timing", f"app;dur={dur_ms:.3f}".encode())]}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # bounded label values
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)


_QUERY = re.compile(r"\?[^ \"]*")


class RedactQueryFilter(logging.Filter):
    """Drop query-string values and anything shaped like a workspace key from access-log lines
    (uvicorn.access): a key pasted into a URL must not end up in logs. `?a=1&b=2` becomes
    `?a=...&b=...`; `/workspaces/fsk_abc/...` becomes `/workspaces/fsk_.../...`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_KEY_LIKE = re.compile(r"fsk_[A-Za-z0-9_-]+")


def _redact(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        pairs = m.group(0)[1:].split("&")
        return "?" + "&".join(p.split("=", 1)[0] + "=..." if "=" in p else "..." for p in pairs)

    return _KEY_LIKE.sub("fsk_...", _QUERY.sub(one, text))  # a key pasted into the path, too
