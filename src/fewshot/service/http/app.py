"""The HTTP app, assembled: the state loaded once in `lifespan`, the error handlers, the routers
(one per resource, `fewshot.service.http.routes`), the web page and the middleware.

Routes (JSON; errors are `{"error": {"code", "message"}}`):
  GET  /healthz, /readyz, /metrics, /models, /model (the default model), /docs, /ui/ (static web page)
  POST /workspaces (admin key) -> workspace id + its API key (shown once); body `model` picks one of /models
  GET/PATCH/DELETE /workspaces/{ws}
  GET/POST /workspaces/{ws}/classes; GET/PATCH/DELETE /workspaces/{ws}/classes/{cid}
  POST /workspaces/{ws}/classes/{cid}/images
  POST /workspaces/{ws}/classify, /workspaces/{ws}/explain, /workspaces/{ws}/occlusion
  GET  /workspaces/{ws}/insight (held-out accuracy per class, confusion matrix, confused pairs)
  GET  /workspaces/{ws}/examples/{eid}/thumbnail.png
  GET  /workspaces/{ws}/export -> zip: model.onnx (standalone classifier) + labels.json
Several models may be served (`serve BUNDLE [BUNDLE ...]`); each workspace runs on the model it
was created with (`fewshot.service.models`).
Security defaults: keys only in `Authorization` (`http.auth`), /metrics needs the admin key
(`metrics_public`), /docs is off (`docs`), the page is served with a Content-Security-Policy,
multipart text fields are strict (`forms`), embedding is chunked and bounded (`embedding`: 503 busy +
Retry-After), and `serve` cuts off slow clients (`protocol`: 408). A store outage is a 503 with
Retry-After and no URL or credentials; /readyz reports it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from fewshot.service.auth import KeyGuard
from fewshot.service.costs import ExportCache, ImageBudget, OneAtATime, Refitter
from fewshot.service.embedding import EmbedGate, GatedEmbedder, HeapTrimmer, limit_malloc_arenas
from fewshot.service.forms import ServiceRoute
from fewshot.service.http.deps import ServiceState
from fewshot.service.http.errors import install_error_handlers
from fewshot.service.http.routes import classes, export, inference, insight, system, workspaces
from fewshot.service.insight import InsightCache
from fewshot.service.middleware import (
    BodyLimitMiddleware,
    Metrics,
    MetricsMiddleware,
    RedactQueryFilter,
    SecurityHeadersMiddleware,
)
from fewshot.service.models import load_models
from fewshot.service.notify import StoreCollector
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import open_store
from fewshot.service.views import WorkspaceViews

STATIC_DIR = Path(__file__).parents[1] / "static"
MAX_TEXT_FIELD_BYTES = 64 * 1024  # a multipart text field (label, top_k, ...); a label is at most 200 characters
log = logging.getLogger("fewshot.service")


def open_state(settings: ServiceSettings) -> ServiceState:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.malloc_arenas and not limit_malloc_arenas(settings.malloc_arenas):
        log.info("malloc_arenas=%s ignored: the C library is not glibc", settings.malloc_arenas)
    store = open_store(settings.db_url, notifications=settings.store_notifications)
    try:
        models = load_models(settings, store)
    except BaseException:
        store.close()
        raise
    # one queue for every model: they share the cores; a run holds at most embed_chunk images, of one
    # request or batched across requests (fewshot.service.embedding)
    gate = EmbedGate(settings.embed_slots, settings.embed_queue, settings.embed_wait_s, max_batch=settings.embed_chunk)
    for m in models.models:
        m.recogniser.embedder = GatedEmbedder(m.recogniser.embedder, gate, settings.embed_chunk)
    return ServiceState(settings, models.default.bundle, store, models.default.recogniser, models, WorkspaceViews(store),
                        gate)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    for warning in app.state.settings.admin_key_warnings():
        log.warning("SECURITY: %s", warning)
    state = open_state(app.state.settings)
    app.state.service = state
    app.state.refitter = Refitter()
    trimmer = HeapTrimmer(state.gate)  # memory back to the system after a burst
    try:
        yield
    finally:
        trimmer.close()
        app.state.refitter.close()
        app.state.service = None
        state.store.close()


def create_app(settings: ServiceSettings) -> FastAPI:
    """The ASGI app; nothing is loaded until the lifespan starts (TestClient context / uvicorn)."""
    app = FastAPI(title="fewshot recogniser", version="1", lifespan=lifespan,
                  description="Teach image classes from a few examples; classify, explain, reject unknowns.",
                  docs_url="/docs" if settings.docs else None, redoc_url="/redoc" if settings.docs else None,
                  # files beyond the per-request limit stop the parse (413); text fields are a few bytes
                  form_limits={"max_files": settings.max_images_per_request, "max_part_size": MAX_TEXT_FIELD_BYTES})
    app.router.route_class = ServiceRoute  # strict multipart text fields (fewshot.service.forms)
    app.state.settings = settings
    app.state.key_guard = KeyGuard(settings.admin_key, limit=settings.admin_failures_per_minute,
                                   total_limit=settings.admin_failures_per_minute_total, window_s=60.0)
    app.state.service = None
    app.state.metrics = Metrics()
    app.state.metrics.registry.register(StoreCollector(lambda: getattr(app.state.service, "store", None)))
    app.state.insight_cache = InsightCache()
    # cost bounds of the routes that multiply work (fewshot.service.costs)
    app.state.occlusion_budget = ImageBudget()
    app.state.insight_turn = OneAtATime("insight")
    app.state.export_cache = ExportCache()
    install_error_handlers(app)
    for routes in (system, workspaces, classes, inference, export, insight):
        app.include_router(routes.router)
    app.mount("/ui", StaticFiles(directory=settings.static_dir or STATIC_DIR, html=True), name="ui")
    app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: app.state.settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(SecurityHeadersMiddleware, csp_exempt=("/docs", "/redoc") if settings.docs else ())
    return app


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` / several workers: settings from FEWSHOT_* variables."""
    logging.getLogger("uvicorn.access").addFilter(RedactQueryFilter())
    return create_app(ServiceSettings.from_env())
