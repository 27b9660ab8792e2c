"""HTTP service: FastAPI app over the recogniser. The bundle and store are opened once in `lifespan`.

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
Workspace routes take `Authorization: Bearer <key>` (keys are accepted in no other place, and a
key-like query parameter is refused so it never reaches an access log); the admin key opens all.
Security defaults: /metrics needs the admin key (`metrics_public`), /docs is off (`docs`), failed
key attempts are throttled (`auth.KeyGuard`: admin-key guesses per address and service-wide, mistyped
workspace keys apart; 429 + Retry-After), the page is served with a Content-Security-Policy, multipart
text fields are strict (`forms`), embedding is chunked and bounded (`embedding`: 503 busy +
Retry-After), and `serve` cuts off slow clients (`protocol`: 408). A store outage is a 503 with
Retry-After and no URL or credentials; /readyz reports it.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from fewshot.artifacts.bundle import Bundle
from fewshot.errors import ConfigError, FewshotError
from fewshot.service.auth import KeyGuard, hash_key, key_matches, secret_matches
from fewshot.service.costs import ExportCache, ImageBudget, OneAtATime, OverBudget, Refitter
from fewshot.service.embedding import EmbedGate, GatedEmbedder, ServiceBusy, one_request
from fewshot.service.forms import FormError, ServiceRoute
from fewshot.service.images import UploadError, decode_upload
from fewshot.service.insight import (
    MAX_CELLS,
    MIN_CELLS,
    InsightCache,
    recogniser_insight,
    recogniser_occlusion,
)
from fewshot.service.insight_api import InsightOut, OcclusionOut, insight_out, occlusion_out
from fewshot.service.middleware import (
    BodyLimitMiddleware,
    Metrics,
    MetricsMiddleware,
    RedactQueryFilter,
    SecurityHeadersMiddleware,
)
from fewshot.service.models import ModelSet, ServedModel, UnknownModelError, load_models
from fewshot.service.notify import StoreCollector
from fewshot.service.protocol import DeadlineH11Protocol
from fewshot.service.recogniser import (
    Explanation,
    Prediction,
    Recogniser,
    WorkspaceSettings,
    check_label,
)
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import (
    ClassRecord,
    ConflictError,
    InvalidInput,
    NotFoundError,
    Store,
    StoreError,
    StoreUnavailable,
    is_id,
    open_store,
)

STATIC_DIR = Path(__file__).parent / "static"
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 409: "conflict", 413: "body_too_large", 415: "unsupported_media_type",
                 422: "invalid_request", 500: "internal_error", 503: "not_ready"}


MAX_TEXT_FIELD_BYTES = 64 * 1024  # a multipart text field (label, top_k, ...); a label is at most 200 characters
SENSITIVE_QUERY = ("api_key", "apikey", "key", "token", "access_token", "admin_key", "password")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class ServiceState:
    settings: ServiceSettings
    bundle: Bundle  # the default model's
    store: Store
    recogniser: Recogniser  # the default model's; a workspace's own is `ModelDep` / `models.of_workspace`
    models: ModelSet


# -- response models (the OpenAPI schema the web page codes against) -----------------------------
class WorkspaceIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    settings: dict[str, Any] = Field(default_factory=dict)
    model: str | None = Field(None, max_length=200, description="one of GET /models; omitted: the default model")


class WorkspaceOut(BaseModel):
    id: str
    name: str
    settings: dict[str, Any]
    version: int
    model: str = Field(description="the model the workspace runs on (fixed at creation)")
    api_key: str | None = None  # only in the response that created the workspace


class SettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str | None = None
    head: str | None = None
    threshold: float | None = Field(None, allow_inf_nan=False, ge=0.0, description=(
        "the unknown threshold on the novelty scale (>= 0; larger accepts more); an explicit null clears it "
        "(back to the calibrated one), like clear_threshold"))

    @field_validator("threshold", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("threshold must be a number, not true/false")
        return v
    clear_threshold: bool = Field(False, description="back to the calibrated threshold; not with `threshold`")


class ClassOut(BaseModel):
    id: str
    label: str
    n_examples: int
    version: int
    example_ids: list[str] | None = None


class RenameIn(BaseModel):
    label: str = Field(min_length=1, max_length=200)


class CandidateOut(BaseModel):
    class_id: str
    label: str
    probability: float
    score: float


class PredictionOut(BaseModel):
    image: str
    label: str
    class_id: str | None
    known: bool
    probability: float
    score: float = Field(description="the nearest prototype's score: squared distance or cosine similarity")
    novelty: float | None = Field(description="how unlike its nearest class the image is (open-set rule); "
                                  "known when novelty <= threshold")
    threshold: float | None
    rule: str | None = Field(None, description="the open-set rule's kind, e.g. 'spread'")
    metric: str
    top_k: list[CandidateOut]
    out_of_domain: bool = Field(False, description="the image is far outside what the model was trained on; "
                                "the answer is given but should not be trusted")
    domain_score: float | None = Field(None, description="> 1: out of domain; null when the bundle has no domain summary")
    domain_reasons: list[str] = Field(default_factory=list)


class ClassifyOut(BaseModel):
    predictions: list[PredictionOut]
    bundle_id: str
    model: str


class NeighbourOut(BaseModel):
    example_id: str
    class_id: str
    label: str
    score: float
    thumbnail_png_base64: str


class ExplainOut(BaseModel):
    prediction: PredictionOut
    neighbours: list[NeighbourOut]


class OcclusionPredictionOut(OcclusionOut):
    prediction: PredictionOut


# -- dependencies --------------------------------------------------------------------------------
# Dependencies that only read attributes are `async def`: FastAPI runs a plain `def` dependency in
# the threadpool, a hand-off per dependency per request (issue 16: five hand-offs per classify).
async def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet; retry shortly")
    return state  # type: ignore[no-any-return]


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
StateDep = Annotated[ServiceState, Depends(get_state)]


def _presented_key(request: Request) -> str:
    """The bearer key of `Authorization`; keys in the query string are refused (they get logged)."""
    leaked = [k for k in request.query_params if k.lower().replace("-", "_") in SENSITIVE_QUERY]
    if leaked:
        raise ApiError(400, "key_in_url", f"query parameter {leaked[0]!r} looks like a key; keys in URLs end up "
                       "in logs and browser history: send 'Authorization: Bearer <key>' instead (and rotate it)")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ""


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _throttled(request: Request, key: str, what: str) -> None:
    """429 + Retry-After while failed attempts of `key`'s kind are over their limit (`KeyGuard`)."""
    guard: KeyGuard = request.app.state.key_guard
    wait, scope = guard.retry_after(_client(request), key)
    if wait:
        where = "from this address" if scope == "per-address" else "from many addresses (a service-wide limit)"
        raise ApiError(429, "too_many_attempts", f"too many failed {what} attempts {where}; retry in {wait} s",
                       headers={"Retry-After": str(wait)})


def check_admin(request: Request, settings: ServiceSettings) -> None:
    """The admin key, or 401/403/429: failed attempts are throttled (`KeyGuard`)."""
    key = _presented_key(request)
    if not settings.admin_key:
        raise ApiError(403, "forbidden", "admin routes (workspace creation, /metrics) are disabled: set "
                       "FEWSHOT_ADMIN_KEY on the server (or FEWSHOT_METRICS_PUBLIC=1 for /metrics)")
    _throttled(request, key, "admin-key")
    if not key:
        raise ApiError(401, "unauthorized", "missing admin key; send 'Authorization: Bearer <admin key>'")
    guard: KeyGuard = request.app.state.key_guard
    if not secret_matches(key, settings.admin_key):
        guard.failed(_client(request), key)
        raise ApiError(401, "unauthorized", "wrong admin key" + ("" if guard.is_admin_guess(key) else
                       " (this is a workspace key: it opens its workspace's routes only)"))
    guard.admin_succeeded(_client(request))


def require_admin(request: Request, settings: SettingsDep) -> None:
    check_admin(request, settings)


def workspace_access(request: Request, ws: Annotated[str, PathParam(max_length=64)],
                     state: StateDep, settings: SettingsDep) -> str:
    """The workspace id, if the presented key opens it: no/unknown key 401; a valid key of another
    workspace: 403 if `ws` exists, 404 if not; the admin key: 404 for a workspace that does not exist."""
    key = _presented_key(request)
    if not key:
        raise ApiError(401, "unauthorized", "missing API key; send 'Authorization: Bearer <workspace key>'")
    record = state.store.get_workspace(ws) if is_id(ws, "ws") else None  # ids are checked before any query
    request.state.workspace = record
    if record is not None and key_matches(key, record.key_hash):
        return ws
    missing = ApiError(404, "not_found", f"workspace {_short(ws)!r} does not exist; list yours with the key it came with")
    _throttled(request, key, "key")  # the admin key opens every route: guesses count everywhere
    guard: KeyGuard = request.app.state.key_guard
    if secret_matches(key, settings.admin_key):
        guard.admin_succeeded(_client(request))
        if record is None:
            raise missing
        return ws
    own = state.store.workspace_by_key_hash(hash_key(key))
    if own is not None:
        if record is None:
            raise missing
        raise ApiError(403, "forbidden", f"this API key opens workspace {own.id!r}, not {_short(ws)!r}")
    guard.failed(_client(request), key)
    raise ApiError(401, "unauthorized", "wrong API key for this workspace")


def _short(text: str, n: int = 80) -> str:
    """User-given text echoed in an error, cut to `n` characters."""
    return text if len(text) <= n else text[:n] + "..."


WorkspaceDep = Annotated[str, Depends(workspace_access)]


async def workspace_model(request: Request, ws: WorkspaceDep, state: StateDep) -> ServedModel:
    """The model the (authorised) workspace was created with."""
    return state.models.of_workspace(request.state.workspace)


ModelDep = Annotated[ServedModel, Depends(workspace_model)]


# -- helpers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Uploads:
    arrays: np.ndarray  # uint8 (N, C, H, W) under the bundle's preprocessing
    thumbnails: list[bytes]
    names: list[str]
    previews: list[np.ndarray]  # each upload as a small RGB array, for the out-of-domain check


def _decode_all(files: list[UploadFile], model: ServedModel, settings: ServiceSettings, *,
                thumbnails: bool = True) -> Uploads:
    """Uploads, decoded one at a time; refuses the request on any bad image."""
    if not files:
        raise ApiError(400, "no_images", "no images in the request; send one or more 'images' file fields")
    if len(files) > settings.max_images_per_request:
        raise ApiError(413, "too_many_images", f"{len(files)} images exceed the limit of "
                       f"{settings.max_images_per_request} per request; split the upload")
    pre = model.bundle.preprocessing
    domain = model.recogniser.domain
    side = domain.stats_side if domain is not None else 0  # no domain summary: no check, no preview
    arrays, thumbs, names, previews = [], [], [], []
    budget = settings.max_request_pixels
    for i, f in enumerate(files):
        if budget <= 0:
            raise ApiError(413, "request_too_large", f"the images of this request decode to more than "
                           f"{settings.max_request_pixels:,} pixels in all; send fewer large images per request")
        name = _short(f.filename or f"image {i}")
        d = decode_upload(f.file.read(), pre, max_pixels=min(settings.max_image_pixels, budget),
                          thumbnail_size=settings.thumbnail_size, name=name, thumbnail=thumbnails, preview_side=side)
        budget -= d.pixels
        arrays.append(d.array)
        thumbs.append(d.thumbnail_png)
        names.append(name)
        previews.append(d.preview)
    return Uploads(np.stack(arrays), thumbs, names, previews)


def _class_out(rec: ClassRecord, example_ids: list[str] | None = None) -> ClassOut:
    return ClassOut(id=rec.id, label=rec.label, n_examples=rec.n_examples, version=rec.version, example_ids=example_ids)


def _prediction_out(name: str, p: Prediction) -> PredictionOut:
    return PredictionOut(image=name, label=p.label, class_id=p.class_id, known=p.known, probability=p.probability,
                         score=p.score, novelty=p.novelty, threshold=p.threshold, rule=p.rule, metric=p.metric,
                         out_of_domain=p.out_of_domain, domain_score=p.domain_score,
                         domain_reasons=list(p.domain_reasons),
                         top_k=[CandidateOut(**c.__dict__) for c in p.top_k])


def _explain_out(name: str, e: Explanation) -> ExplainOut:
    return ExplainOut(prediction=_prediction_out(name, e.prediction), neighbours=[
        NeighbourOut(example_id=n.example_id, class_id=n.class_id, label=n.label, score=n.score,
                     thumbnail_png_base64=base64.b64encode(n.thumbnail_png).decode()) for n in e.neighbours])


# -- app -----------------------------------------------------------------------------------------
def open_state(settings: ServiceSettings) -> ServiceState:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
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
    return ServiceState(settings, models.default.bundle, store, models.default.recogniser, models)


log = logging.getLogger("fewshot.service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    for warning in app.state.settings.admin_key_warnings():
        log.warning("SECURITY: %s", warning)
    state = open_state(app.state.settings)
    app.state.service = state
    app.state.refitter = Refitter()
    try:
        yield
    finally:
        app.state.refitter.close()
        app.state.service = None
        state.store.close()


def _install_error_handlers(app: FastAPI) -> None:
    def body(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        response = body(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = exc.code if isinstance(exc, FormError) else _STATUS_CODES.get(exc.status_code, "error")
        return body(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return body(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(FewshotError)
    async def _fewshot(_: Request, exc: FewshotError) -> JSONResponse:
        if isinstance(exc, UploadError):
            return body(exc.status, exc.code, str(exc))
        if isinstance(exc, NotFoundError):
            return body(404, "not_found", str(exc))
        if isinstance(exc, ConflictError):
            return body(409, "conflict", str(exc))
        if isinstance(exc, ServiceBusy):
            response = body(503, "busy", str(exc))
            response.headers["Retry-After"] = str(exc.retry_after_s)
            return response
        if isinstance(exc, OverBudget):
            response = body(429, "over_budget", str(exc))
            response.headers["Retry-After"] = str(exc.retry_after_s)
            return response
        if isinstance(exc, StoreUnavailable):  # a server fault; the message holds no URL or credentials
            response = body(503, "store_unavailable", str(exc))
            if exc.retry_after_s:  # 0: the outcome is unknown; an automatic retry could apply it twice
                response.headers["Retry-After"] = str(exc.retry_after_s)
            return response
        if isinstance(exc, InvalidInput):
            return body(400, "invalid_input", str(exc))
        if isinstance(exc, StoreError):
            return body(400, "store_error", str(exc))
        return body(400, "invalid_argument", str(exc))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return body(500, "internal_error", f"internal error ({type(exc).__name__}); the request was not applied")


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
    _install_error_handlers(app)
    _add_system_routes(app)
    _add_workspace_routes(app)
    _add_class_routes(app)
    _add_inference_routes(app)
    _add_export_routes(app)
    _add_insight_routes(app)
    app.mount("/ui", StaticFiles(directory=settings.static_dir or STATIC_DIR, html=True), name="ui")
    app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: app.state.settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(SecurityHeadersMiddleware, csp_exempt=("/docs", "/redoc") if settings.docs else ())
    return app


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` / several workers: settings from FEWSHOT_* variables."""
    logging.getLogger("uvicorn.access").addFilter(RedactQueryFilter())
    return create_app(ServiceSettings.from_env())


def _add_system_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.api_route("/healthz", methods=["GET", "HEAD"], tags=["system"])
    def healthz() -> dict[str, str]:
        """The process is up (no dependencies checked)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["system"])
    def readyz(state: StateDep) -> dict[str, Any]:
        """The model is loaded and the store answers (503 with Retry-After while it does not)."""
        state.store.model_identity()
        feed = state.store.feed
        return {"status": "ready", "bundle_id": state.bundle.bundle_id,
                "notifications": "off" if feed is None else "listening" if feed.connected else "reconnecting"}

    @app.get("/metrics", tags=["system"], include_in_schema=False)
    def metrics(request: Request, settings: SettingsDep) -> Response:
        """Prometheus metrics (request counts and latencies by route; no per-workspace labels).
        Needs the admin key unless the service runs with metrics_public."""
        if not settings.metrics_public:
            check_admin(request, settings)
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/models", tags=["system"])
    def models(state: StateDep) -> list[dict[str, Any]]:
        """The served models a workspace may choose at creation (the first is the default): name,
        bundle id, image mode and size, embedding size, backbone, whether trained here."""
        return state.models.describe()

    @app.get("/model", tags=["system"])
    def model(state: StateDep) -> dict[str, Any]:
        """What the service runs by default: bundle id, backbone, preprocessing, metrics, calibration."""
        m = state.bundle.manifest
        cal = state.recogniser.calibration
        source = {k: v for k, v in m.source.items() if k in ("name", "learner", "step", "calibrated_on")}
        return {"bundle_id": m.bundle_id, "backbone": m.backbone, "preprocessing": m.preprocessing,
                "embedding_dim": m.embedding_dim, "metrics": m.metrics, "source": source,
                "calibration": cal.to_dict() if cal else None,
                "domain": None if m.domain is None else {k: m.domain[k] for k in ("mode", "size", "trained_on")
                                                         if k in m.domain}}


def _ws_out(rec: Any, model: ServedModel, api_key: str | None = None) -> WorkspaceOut:
    return WorkspaceOut(id=rec.id, name=rec.name, settings=rec.settings, version=rec.version, model=model.name,
                        api_key=api_key)


def _add_workspace_routes(app: FastAPI) -> None:
    @app.post("/workspaces", status_code=201, tags=["workspaces"], dependencies=[Depends(require_admin)])
    def create_workspace(body: WorkspaceIn, state: StateDep) -> WorkspaceOut:
        """Create a workspace (admin key) on one of the served models (`model`, default: the first of
        GET /models); the response holds its API key, shown only once."""
        try:
            model = state.models.get(body.model)
        except UnknownModelError as exc:
            raise ApiError(400, "unknown_model", str(exc)) from exc
        rec = model.recogniser
        ws, key = rec.create_workspace(body.name, WorkspaceSettings.from_dict(body.settings, rec.defaults))
        return _ws_out(ws, model, key)

    @app.get("/workspaces/{ws}", tags=["workspaces"])
    def get_workspace(ws: WorkspaceDep, model: ModelDep) -> WorkspaceOut:
        return _ws_out(model.recogniser.workspace(ws), model)

    @app.patch("/workspaces/{ws}", tags=["workspaces"])
    def patch_workspace(ws: WorkspaceDep, body: SettingsIn, model: ModelDep) -> WorkspaceOut:
        """Change the decision rule (metric, head) or the unknown threshold of this workspace.
        `{"threshold": null}` clears the threshold (as `clear_threshold: true` does)."""
        given = body.model_dump(exclude_none=True, exclude={"clear_threshold"})
        if "threshold" in given and body.clear_threshold:
            raise ApiError(400, "invalid_argument", f"threshold {given['threshold']:g} and clear_threshold=true "
                           "contradict each other; send one of them")
        clear = body.clear_threshold or ("threshold" in body.model_fields_set and body.threshold is None)
        return _ws_out(model.recogniser.patch_settings(ws, given, clear_threshold=clear), model)

    @app.delete("/workspaces/{ws}", status_code=204, tags=["workspaces"])
    def delete_workspace(ws: WorkspaceDep, model: ModelDep) -> Response:
        model.recogniser.delete_workspace(ws)
        return Response(status_code=204)


Images = Annotated[list[UploadFile], File(description="one or more image files (PNG, JPEG, WebP, BMP, GIF)")]


def _refit_later(request: Request, model: ServedModel, ws: str) -> None:
    """After a change, bring the workspace's decision (a logistic head's refit: seconds) up to date
    in the background (`costs.Refitter`), not in the next classify."""
    request.app.state.refitter.schedule((model.name, ws), lambda: model.recogniser.decision_state(ws))


def _add_class_routes(app: FastAPI) -> None:
    @app.get("/workspaces/{ws}/classes", tags=["classes"])
    def list_classes(ws: WorkspaceDep, model: ModelDep) -> list[ClassOut]:
        return [_class_out(c) for c in model.recogniser.list_classes(ws)]

    @app.post("/workspaces/{ws}/classes", status_code=201, tags=["classes"])
    def add_class(request: Request, ws: WorkspaceDep, model: ModelDep, settings: SettingsDep,
                  images: Images, label: Annotated[str | None, Form()] = None) -> ClassOut:
        """Teach a new class from 1..K images (multipart: `label`, `images`). Labels are stored in
        Unicode NFC, trimmed, at most 200 characters; "unknown" (any letter case or look-alike) is
        reserved; blank-looking, invisible and line-separator characters are refused."""
        label = check_label("" if label is None else label)  # 400 naming the fix, before any decoding
        up = _decode_all(images, model, settings)
        rec = model.recogniser.add_class(ws, label, up.arrays, up.thumbnails)
        request.app.state.metrics.images.labels("register").inc(len(up.arrays))
        _refit_later(request, model, ws)
        return _class_out(rec)

    @app.get("/workspaces/{ws}/classes/{cid}", tags=["classes"])
    def get_class(ws: WorkspaceDep, cid: str, model: ModelDep) -> ClassOut:
        rec, ids = model.recogniser.get_class(ws, cid)
        return _class_out(rec, ids)

    @app.patch("/workspaces/{ws}/classes/{cid}", tags=["classes"])
    def rename_class(ws: WorkspaceDep, cid: str, body: RenameIn, model: ModelDep) -> ClassOut:
        return _class_out(model.recogniser.rename_class(ws, cid, body.label))

    @app.delete("/workspaces/{ws}/classes/{cid}", status_code=204, tags=["classes"])
    def delete_class(ws: WorkspaceDep, cid: str, model: ModelDep) -> Response:
        model.recogniser.delete_class(ws, cid)
        return Response(status_code=204)

    @app.post("/workspaces/{ws}/classes/{cid}/images", tags=["classes"])
    def add_images(request: Request, ws: WorkspaceDep, cid: str, model: ModelDep, settings: SettingsDep,
                   images: Images) -> ClassOut:
        """Add images to a class; only its prototype is updated."""
        up = _decode_all(images, model, settings)
        rec = model.recogniser.add_images(ws, cid, up.arrays, up.thumbnails)
        request.app.state.metrics.images.labels("register").inc(len(up.arrays))
        _refit_later(request, model, ws)
        return _class_out(rec)

    @app.get("/workspaces/{ws}/examples/{eid}/thumbnail.png", tags=["classes"], response_class=Response)
    def thumbnail(ws: WorkspaceDep, eid: str, model: ModelDep) -> Response:
        return Response(model.recogniser.thumbnail(ws, eid), media_type="image/png")


def _add_inference_routes(app: FastAPI) -> None:
    @app.post("/workspaces/{ws}/classify", tags=["inference"], response_model=ClassifyOut)
    def classify(request: Request, ws: WorkspaceDep, model: ModelDep, settings: SettingsDep, images: Images,
                 top_k: Annotated[int, Form(ge=1)] = 5,
                 threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None) -> Response:
        """Top-k classes per image; `label` is "unknown" when the nearest class fails the threshold."""
        # the hot path: serialised here, as FastAPI would re-validate the model in another thread hand-off
        if top_k > settings.max_top_k:
            raise ApiError(400, "invalid_argument", f"top_k {top_k} exceeds the limit of {settings.max_top_k}")
        up = _decode_all(images, model, settings, thumbnails=False)
        preds = model.recogniser.classify(ws, up.arrays, top_k=top_k, threshold=threshold, previews=up.previews)
        request.app.state.metrics.images.labels("classify").inc(len(up.arrays))
        out = ClassifyOut(predictions=[_prediction_out(n, p) for n, p in zip(up.names, preds)],
                          bundle_id=model.bundle_id, model=model.name)
        return Response(out.model_dump_json(), media_type="application/json")

    @app.post("/workspaces/{ws}/explain", tags=["inference"])
    def explain(ws: WorkspaceDep, model: ModelDep, settings: SettingsDep, image: Annotated[UploadFile, File()],
                k: Annotated[int, Form(ge=1, le=50)] = 3,
                threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None) -> ExplainOut:
        """The prediction for one image and the `k` nearest stored examples (ids + PNG thumbnails)."""
        up = _decode_all([image], model, settings, thumbnails=False)
        return _explain_out(up.names[0], model.recogniser.explain(ws, up.arrays[0], k=k, threshold=threshold,
                                                                  preview=up.previews[0]))


def _add_insight_routes(app: FastAPI) -> None:
    @app.get("/workspaces/{ws}/insight", tags=["inference"])
    def insight(request: Request, ws: WorkspaceDep, model: ModelDep) -> InsightOut:
        """What the model knows of the taught classes: held-out accuracy per class (each stored example
        classified by the workspace's rule without itself), the confusion matrix and the most confused
        pairs with a hint. Recomputed only when the workspace's version or rule changes."""
        with request.app.state.insight_turn.turn():  # one computation at a time (fewshot.service.costs)
            return insight_out(recogniser_insight(model.recogniser, ws, request.app.state.insight_cache))

    @app.post("/workspaces/{ws}/occlusion", tags=["inference"])
    def occlusion(request: Request, ws: WorkspaceDep, model: ModelDep, settings: SettingsDep,
                  image: Annotated[UploadFile, File()],
                  cells: Annotated[int, Form(ge=MIN_CELLS, le=MAX_CELLS)] = 7,
                  threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None) -> OcclusionPredictionOut:
        """The prediction for one image and which parts of it moved the answer: a cells x cells map of
        how much the answer's margin over the runner-up drops when each region is covered (1 + cells^2
        images embedded; a workspace may embed at most 600 such images a minute, beyond that 429 +
        Retry-After; they queue behind other requests' images, and the map is refused (503 busy) while
        other images wait for the model)."""
        gate = getattr(model.recogniser.embedder, "gate", None)
        if gate is not None and gate.waiting:  # bulk work starts only when no one waits for the model
            raise ServiceBusy(f"the server is busy ({gate.waiting} batches of images wait for the model; an "
                              "occlusion map embeds many images, so it starts only when none wait)")
        request.app.state.occlusion_budget.spend(ws, 2 + cells * cells)  # the prediction, the original, the maps
        up = _decode_all([image], model, settings, thumbnails=False)
        with one_request():
            pred = model.recogniser.classify(ws, up.arrays, top_k=1, threshold=threshold, previews=up.previews)[0]
            top = pred.top_k[0]
            m = recogniser_occlusion(model.recogniser, ws, up.arrays[0], top.class_id, cells)
        return OcclusionPredictionOut(prediction=_prediction_out(up.names[0], pred),
                                      **occlusion_out(m, up.arrays[0], top.class_id, top.label).model_dump())


def _add_export_routes(app: FastAPI) -> None:
    @app.get("/workspaces/{ws}/export", tags=["inference"], response_class=Response,
             responses={200: {"content": {"application/zip": {}}}})
    def export(request: Request, ws: WorkspaceDep, model: ModelDep) -> Response:
        """The workspace as one standalone classifier: a zip of `model.onnx` (embedder, prototypes,
        decision rule and unknown threshold; runs on ONNX Runtime alone) and `labels.json` (labels in
        output order, preprocessing, rule, how to read the outputs). Built once per version of the
        workspace (and of its settings), one build at a time."""
        from fewshot.service.standalone import export_workspace  # onnx: imported on first use

        rec = request.state.workspace
        key = (rec.version, json.dumps(rec.settings, sort_keys=True), model.bundle_id, model.name)

        zipped = request.app.state.export_cache.get(
            ws, key, lambda: export_workspace(model.recogniser, model.bundle, ws, model_name=model.name).zip_bytes())
        return Response(zipped, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{ws}-classifier.zip"'})


def proxy_trust(env: Mapping[str, str]) -> tuple[bool, str | None]:
    """(whether to read X-Forwarded-For, from which addresses) for uvicorn. The header is trusted only
    when FORWARDED_ALLOW_IPS names the proxy's addresses or networks: otherwise any local process (an
    ssh tunnel, a port-forward) could pick its client address and dodge the key throttle. "*" is
    refused: with it uvicorn takes the leftmost address of the header, which the client writes."""
    raw = env.get("FORWARDED_ALLOW_IPS", "").strip()
    if not raw:
        return False, None
    if "*" in (p.strip() for p in raw.split(",")):
        raise ConfigError(f"FORWARDED_ALLOW_IPS={raw!r} trusts X-Forwarded-For from any client, so any client "
                          "could choose the address the key throttle counts; name your proxy's address or network "
                          "(e.g. FORWARDED_ALLOW_IPS=172.28.0.10 or 10.0.0.0/8), or unset it")
    return True, raw


def serve(bundles: str | Path | Sequence[str | Path], db_url: str, host: str = "127.0.0.1", port: int = 8000, *,
          admin_key: str | None = None, workers: int = 1, log_level: str = "info") -> None:
    """Run the service under uvicorn (blocking) on one or more bundles (each a folder or NAME=PATH;
    the first is the default model). Other settings come from FEWSHOT_* variables."""
    import os

    import uvicorn

    logging.getLogger("uvicorn.access").addFilter(RedactQueryFilter())
    specs = [str(bundles)] if isinstance(bundles, str | Path) else [str(b) for b in bundles]
    if not specs:
        raise ConfigError("no bundle given; pass one or more bundle folders (or NAME=PATH)")
    settings = ServiceSettings.from_env(bundle_path=specs[0], extra_bundles=tuple(specs[1:]) or None, db_url=db_url,
                                        admin_key=admin_key)
    if admin_key is not None:
        log.warning("SECURITY: the admin key was given as a command-line argument (--admin-key): every user of "
                    "this machine can read it in `ps` and shell history; set FEWSHOT_ADMIN_KEY instead")
    if not settings.torch_threads:
        settings = replace(settings, torch_threads=1)
    proxy_headers, allow_ips = proxy_trust(os.environ)
    if settings.request_read_timeout_s <= 0:
        raise ConfigError(f"FEWSHOT_REQUEST_READ_TIMEOUT_S={settings.request_read_timeout_s} must be > 0 seconds")
    # slow clients: each request must arrive within request_read_timeout_s (fewshot.service.protocol)
    DeadlineH11Protocol.read_timeout_s = settings.request_read_timeout_s
    os.environ["FEWSHOT_REQUEST_READ_TIMEOUT_S"] = str(settings.request_read_timeout_s)  # for worker processes
    common: dict[str, Any] = dict(host=host, port=port, log_level=log_level, proxy_headers=proxy_headers,
                                  forwarded_allow_ips=allow_ips, http=DeadlineH11Protocol)
    if workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    os.environ.update({"FEWSHOT_BUNDLE_PATH": settings.bundle_path,
                       "FEWSHOT_EXTRA_BUNDLES": os.pathsep.join(settings.extra_bundles), "FEWSHOT_DB_URL": settings.db_url,
                       "FEWSHOT_ADMIN_KEY": settings.admin_key, "FEWSHOT_TORCH_THREADS": str(settings.torch_threads)})
    uvicorn.run("fewshot.service.app:create_app_from_env", factory=True, workers=workers, **common)
