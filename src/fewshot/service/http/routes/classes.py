"""Class routes: teach a class from a few images, add images, rename, delete; stored thumbnails."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from fewshot.service.forms import ServiceRoute
from fewshot.service.http.auth import ModelDep, WorkspaceDep
from fewshot.service.http.deps import SettingsDep
from fewshot.service.http.schemas import ClassOut, RenameIn, class_out
from fewshot.service.http.uploads import Images, decode_all
from fewshot.service.labels import check_label
from fewshot.service.models import ServedModel

router = APIRouter(route_class=ServiceRoute)  # strict multipart text fields (fewshot.service.forms)


def _refit_later(request: Request, model: ServedModel, ws: str) -> None:
    """After a change, bring the workspace's decision (a logistic head's refit: seconds) up to date
    in the background (`costs.Refitter`), not in the next classify."""
    request.app.state.refitter.schedule((model.name, ws), lambda: model.recogniser.decision_state(ws))


@router.get("/workspaces/{ws}/classes", tags=["classes"])
def list_classes(ws: WorkspaceDep, model: ModelDep) -> list[ClassOut]:
    return [class_out(c) for c in model.recogniser.list_classes(ws)]


@router.post("/workspaces/{ws}/classes", status_code=201, tags=["classes"])
def add_class(request: Request, ws: WorkspaceDep, model: ModelDep, settings: SettingsDep,
              images: Images, label: Annotated[str | None, Form()] = None) -> ClassOut:
    """Teach a new class from 1..K images (multipart: `label`, `images`). Labels are stored in
    Unicode NFC, trimmed, at most 200 characters; "unknown" (any letter case or look-alike) is
    reserved; blank-looking, invisible and line-separator characters are refused."""
    label = check_label("" if label is None else label)  # 400 naming the fix, before any decoding
    up = decode_all(images, model, settings)
    rec = model.recogniser.add_class(ws, label, up.arrays, up.thumbnails)
    request.app.state.metrics.images.labels("register").inc(len(up.arrays) * model.recogniser.views_per_image)
    _refit_later(request, model, ws)
    return class_out(rec)


@router.get("/workspaces/{ws}/classes/{cid}", tags=["classes"])
def get_class(ws: WorkspaceDep, cid: str, model: ModelDep) -> ClassOut:
    rec, ids = model.recogniser.get_class(ws, cid)
    return class_out(rec, ids)


@router.patch("/workspaces/{ws}/classes/{cid}", tags=["classes"])
def rename_class(ws: WorkspaceDep, cid: str, body: RenameIn, model: ModelDep) -> ClassOut:
    return class_out(model.recogniser.rename_class(ws, cid, body.label))


@router.delete("/workspaces/{ws}/classes/{cid}", status_code=204, tags=["classes"])
def delete_class(ws: WorkspaceDep, cid: str, model: ModelDep) -> Response:
    model.recogniser.delete_class(ws, cid)
    return Response(status_code=204)


@router.post("/workspaces/{ws}/classes/{cid}/images", tags=["classes"])
def add_images(request: Request, ws: WorkspaceDep, cid: str, model: ModelDep, settings: SettingsDep,
               images: Images) -> ClassOut:
    """Add images to a class; only its prototype is updated."""
    up = decode_all(images, model, settings)
    rec = model.recogniser.add_images(ws, cid, up.arrays, up.thumbnails)
    request.app.state.metrics.images.labels("register").inc(len(up.arrays) * model.recogniser.views_per_image)
    _refit_later(request, model, ws)
    return class_out(rec)


@router.get("/workspaces/{ws}/examples/{eid}/thumbnail.png", tags=["classes"], response_class=Response)
def thumbnail(ws: WorkspaceDep, eid: str, model: ModelDep) -> Response:
    return Response(model.recogniser.thumbnail(ws, eid), media_type="image/png")
