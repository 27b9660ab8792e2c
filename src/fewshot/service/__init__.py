"""service stage: the recogniser core (class memory over a store; no HTTP), the store by backend
(`store/`), the HTTP layer (`http/`), the static web page.

Imports only from earlier stages (data, backbones, artifacts); never from training code. Names are
resolved lazily so `fewshot.service.store` can be used without importing FastAPI or torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_app": "http.app", "create_app_from_env": "http.app", "serve": "http.serve",
    "Prediction": "recogniser", "Recogniser": "recogniser", "RecogniserConfig": "recogniser",
    "WorkspaceSettings": "workspace_settings", "ServiceSettings": "settings", "RequestError": "errors",
    "ModelIdentity": "store", "ModelMismatchError": "store", "PostgresStore": "store", "SQLiteStore": "store",
    "Store": "store", "open_store": "store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fewshot.service' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fewshot.service.{_EXPORTS[name]}"), name)
