"""The service's state as FastAPI dependencies: the settings and the loaded models and store.

Dependencies that only read attributes are `async def`: FastAPI runs a plain `def` dependency in
the threadpool, a hand-off per dependency per request (issue 16: five hand-offs per classify).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from fewshot.artifacts.bundle import Bundle
from fewshot.service.embedding import EmbedGate
from fewshot.service.http.errors import ApiError
from fewshot.service.models import ModelSet
from fewshot.service.recogniser import Recogniser
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import Store
from fewshot.service.views import WorkspaceViews


@dataclass
class ServiceState:
    """What `lifespan` loads once: the models (each with its recogniser) and the store they share."""

    settings: ServiceSettings
    bundle: Bundle  # the default model's
    store: Store
    recogniser: Recogniser  # the default model's; a workspace's own is `ModelDep` / `models.of_workspace`
    models: ModelSet
    views: WorkspaceViews  # each workspace's record, read again only when its version moved
    gate: EmbedGate  # the one embedding queue every model's images go through


async def get_settings(request: Request) -> ServiceSettings:
    settings: ServiceSettings = request.app.state.settings
    return settings


async def get_state(request: Request) -> ServiceState:
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "not_ready", "the model is not loaded yet; retry shortly")
    return state


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
StateDep = Annotated[ServiceState, Depends(get_state)]
