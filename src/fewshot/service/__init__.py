"""service stage: recogniser (class memory over a store), HTTP app, static web page.

Imports only from earlier stages (data, backbones, artifacts); never from training code. Names are
resolved lazily so `fewshot.service.store` can be used without importing FastAPI or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "app", "create_app_from_env": "app", "serve": "app",
    "Prediction": "recogniser", "Recogniser": "recogniser", "RecogniserConfig": "recogniser",
    "WorkspaceSettings": "recogniser", "ServiceSettings": "settings",
    "ModelIdentity": "store", "ModelMismatchError": "store", "PostgresStore": "store", "SQLiteStore": "store",
    "Store": "store", "open_store": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fewshot.service' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fewshot.service.{_EXPORTS[name]}"), name)
