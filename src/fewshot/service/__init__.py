"""service stage: recogniser (class memory over a store), HTTP app, static web page.

Imports only from earlier stages (data, backbones, artifacts); never from training code.
"""

from fewshot.service.app import create_app, create_app_from_env, serve
from fewshot.service.recogniser import (
    Prediction,
    Recogniser,
    RecogniserConfig,
    WorkspaceSettings,
)
from fewshot.service.settings import ServiceSettings
from fewshot.service.store import (
    ModelIdentity,
    ModelMismatchError,
    PostgresStore,
    SQLiteStore,
    Store,
    open_store,
)

__all__ = [
    "ModelIdentity", "ModelMismatchError", "PostgresStore", "Prediction", "Recogniser", "RecogniserConfig",
    "SQLiteStore", "ServiceSettings", "Store", "WorkspaceSettings", "create_app", "create_app_from_env",
    "open_store", "serve",
]
