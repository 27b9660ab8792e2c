"""System routes: the page's redirect, health and readiness, Prometheus metrics, the served models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fewshot.service.forms import ServiceRoute
from fewshot.service.http.auth import check_admin
from fewshot.service.http.deps import SettingsDep, StateDep

router = APIRouter(route_class=ServiceRoute)  # strict multipart text fields (fewshot.service.forms)


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.api_route("/healthz", methods=["GET", "HEAD"], tags=["system"])
def healthz() -> dict[str, str]:
    """The process is up (no dependencies checked)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["system"])
def readyz(state: StateDep) -> dict[str, Any]:
    """The model is loaded and the store answers (503 with Retry-After while it does not)."""
    state.store.model_identity()
    feed = state.store.feed
    return {"status": "ready", "bundle_id": state.bundle.bundle_id,
            "notifications": "off" if feed is None else "listening" if feed.connected else "reconnecting"}


@router.get("/metrics", tags=["system"], include_in_schema=False)
def metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus metrics (request counts and latencies by route; no per-workspace labels).
    Needs the admin key unless the service runs with metrics_public."""
    if not settings.metrics_public:
        check_admin(request, settings)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/models", tags=["system"])
def models(state: StateDep) -> list[dict[str, Any]]:
    """The served models a workspace may choose at creation (the first is the default): name,
    bundle id, image mode and size, embedding size, backbone, whether trained here."""
    return state.models.describe()


@router.get("/model", tags=["system"])
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
