"""Inference routes: classify images, explain one answer by its nearest stored examples."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import Response

from fewshot.service.forms import ServiceRoute
from fewshot.service.http.auth import ModelDep, WorkspaceDep
from fewshot.service.http.deps import SettingsDep
from fewshot.service.http.errors import ApiError
from fewshot.service.http.schemas import ClassifyOut, ExplainOut, explain_out, prediction_out
from fewshot.service.http.uploads import Images, decode_all

router = APIRouter(route_class=ServiceRoute)  # strict multipart text fields (fewshot.service.forms)


@router.post("/workspaces/{ws}/classify", tags=["inference"], response_model=ClassifyOut)
def classify(request: Request, ws: WorkspaceDep, model: ModelDep, settings: SettingsDep, images: Images,
             top_k: Annotated[int, Form(ge=1)] = 5,
             threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None) -> Response:
    """Top-k classes per image; `label` is "unknown" when the nearest class fails the threshold."""
    # the hot path: serialised here, as FastAPI would re-validate the model in another thread hand-off
    if top_k > settings.max_top_k:
        raise ApiError(400, "invalid_argument", f"top_k {top_k} exceeds the limit of {settings.max_top_k}")
    up = decode_all(images, model, settings, thumbnails=False)
    preds = model.recogniser.classify(ws, up.arrays, top_k=top_k, threshold=threshold, previews=up.previews,
                                      current=request.state.workspace)
    request.app.state.metrics.images.labels("classify").inc(len(up.arrays))
    out = ClassifyOut(predictions=[prediction_out(n, p) for n, p in zip(up.names, preds)],
                      bundle_id=model.bundle_id, model=model.name)
    return Response(out.model_dump_json(), media_type="application/json")


@router.post("/workspaces/{ws}/explain", tags=["inference"])
def explain(request: Request, ws: WorkspaceDep, model: ModelDep, settings: SettingsDep, image: Annotated[UploadFile, File()],
            k: Annotated[int, Form(ge=1, le=50)] = 3,
            threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None) -> ExplainOut:
    """The prediction for one image and the `k` nearest stored examples (ids + PNG thumbnails)."""
    up = decode_all([image], model, settings, thumbnails=False)
    answer = model.recogniser.explain(ws, up.arrays[0], k=k, threshold=threshold, preview=up.previews[0],
                                      current=request.state.workspace)
    return explain_out(up.names[0], answer)
