"""Export route: a taught workspace as one standalone ONNX classifier (a zip)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response

from fewshot.service.forms import ServiceRoute
from fewshot.service.http.auth import ModelDep, WorkspaceDep

router = APIRouter(route_class=ServiceRoute)  # strict multipart text fields (fewshot.service.forms)


@router.get("/workspaces/{ws}/export", tags=["inference"], response_class=Response,
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
