"""Insight routes: what the model knows of the taught classes, occlusion maps of one answer, and the
"Train" step that chooses the workspace's head by what it knows."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile

from fewshot.service.adapt import adapt_workspace
from fewshot.service.embedding import ServiceBusy, one_request
from fewshot.service.forms import ServiceRoute
from fewshot.service.http.auth import ModelDep, WorkspaceDep
from fewshot.service.http.deps import SettingsDep
from fewshot.service.http.schemas import (
    AdaptOut,
    OcclusionPredictionOut,
    prediction_out,
    workspace_out,
)
from fewshot.service.http.uploads import decode_all
from fewshot.service.insight import MAX_CELLS, MIN_CELLS, recogniser_insight, recogniser_occlusion
from fewshot.service.insight_api import InsightOut, insight_out, occlusion_out

router = APIRouter(route_class=ServiceRoute)  # strict multipart text fields (fewshot.service.forms)


@router.get("/workspaces/{ws}/insight", tags=["inference"])
def insight(request: Request, ws: WorkspaceDep, model: ModelDep) -> InsightOut:
    """What the model knows of the taught classes: held-out accuracy per class (each stored example
    classified by the workspace's rule without itself), the confusion matrix and the most confused
    pairs with a hint. Recomputed only when the workspace's version or rule changes."""
    with request.app.state.insight_turn.turn():  # one computation at a time (fewshot.service.costs)
        return insight_out(recogniser_insight(model.recogniser, ws, request.app.state.insight_cache))


@router.post("/workspaces/{ws}/adapt", tags=["inference"])
def adapt(request: Request, ws: WorkspaceDep, model: ModelDep) -> AdaptOut:
    """Train the workspace on its own examples: measure the nearest-prototype and the logistic head on
    held-out stored examples (5-fold cross-validation, answers of "unknown" count as wrong) and serve
    the logistic head only when it answers more of them right. Atomic: a change to the workspace
    while it is measured gives 409 and changes nothing. Needs 10 held-out examples (classes with 2 or
    more images) to compare; with fewer the head stays and `chosen` is null."""
    with request.app.state.insight_turn.turn():  # one computation at a time (fewshot.service.costs)
        report, rec = adapt_workspace(model.recogniser, ws)
    out = workspace_out(rec, model, why=model.recogniser.threshold_why(ws, current=rec))
    return AdaptOut(**report, workspace=out)


@router.post("/workspaces/{ws}/occlusion", tags=["inference"])
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
    up = decode_all([image], model, settings, thumbnails=False)
    with one_request():
        pred = model.recogniser.classify(ws, up.arrays, top_k=1, threshold=threshold, previews=up.previews,
                                         current=request.state.workspace)[0]
        top = pred.top_k[0]
        m = recogniser_occlusion(model.recogniser, ws, up.arrays[0], top.class_id, cells)
    return OcclusionPredictionOut(prediction=prediction_out(up.names[0], pred),
                                  **occlusion_out(m, up.arrays[0], top.class_id, top.label).model_dump())
