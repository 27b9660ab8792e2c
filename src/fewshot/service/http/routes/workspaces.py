"""Workspace routes: create (admin key), read, change the decision settings, delete."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from fewshot.service.forms import ServiceRoute
from fewshot.service.http.auth import ModelDep, WorkspaceDep, require_admin
from fewshot.service.http.deps import StateDep
from fewshot.service.http.errors import ApiError
from fewshot.service.http.schemas import SettingsIn, WorkspaceIn, WorkspaceOut, workspace_out
from fewshot.service.models import UnknownModelError
from fewshot.service.workspace_settings import WorkspaceSettings

router = APIRouter(route_class=ServiceRoute)  # strict multipart text fields (fewshot.service.forms)


@router.post("/workspaces", status_code=201, tags=["workspaces"], dependencies=[Depends(require_admin)])
def create_workspace(body: WorkspaceIn, state: StateDep) -> WorkspaceOut:
    """Create a workspace (admin key) on one of the served models (`model`, default: the first of
    GET /models); the response holds its API key, shown only once."""
    try:
        model = state.models.get(body.model)
    except UnknownModelError as exc:
        raise ApiError(400, "unknown_model", str(exc)) from exc
    rec = model.recogniser
    settings = WorkspaceSettings.from_dict(body.settings, rec.defaults, given_by_user=True)
    ws, key = rec.create_workspace(body.name, settings)
    return workspace_out(ws, model, key)


@router.get("/workspaces/{ws}", tags=["workspaces"])
def get_workspace(ws: WorkspaceDep, model: ModelDep) -> WorkspaceOut:
    rec = model.recogniser.workspace(ws)
    return workspace_out(rec, model, why=model.recogniser.threshold_why(ws, current=rec))


@router.patch("/workspaces/{ws}", tags=["workspaces"])
def patch_workspace(ws: WorkspaceDep, body: SettingsIn, model: ModelDep) -> WorkspaceOut:
    """Change the decision rule (metric, head) or the unknown threshold of this workspace.
    `{"threshold": null}` clears the threshold (as `clear_threshold: true` does)."""
    given = body.model_dump(exclude_none=True, exclude={"clear_threshold"})
    if "threshold" in given and body.clear_threshold:
        raise ApiError(400, "invalid_argument", f"threshold {given['threshold']:g} and clear_threshold=true "
                       "contradict each other; send one of them")
    clear = body.clear_threshold or ("threshold" in body.model_fields_set and body.threshold is None)
    rec = model.recogniser.patch_settings(ws, given, clear_threshold=clear)
    return workspace_out(rec, model, why=model.recogniser.threshold_why(ws, current=rec))


@router.delete("/workspaces/{ws}", status_code=204, tags=["workspaces"])
def delete_workspace(ws: WorkspaceDep, model: ModelDep) -> Response:
    model.recogniser.delete_workspace(ws)
    return Response(status_code=204)
