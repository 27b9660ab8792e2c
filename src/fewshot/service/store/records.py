"""What the store holds and the errors it raises: records, ids, and the error types the service
maps to HTTP statuses (`fewshot.service.app`)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewshot.errors import FewshotError

__all__ = [
    "RETRY_AFTER_S", "ClassRecord", "ConflictError", "ExampleSet", "InvalidInput", "ModelIdentity",
    "ModelMismatchError", "NewExample", "NotFoundError", "StoreError", "StoreUnavailable",
    "WorkspaceChanges", "WorkspaceRecord", "is_id", "new_id",
]

RETRY_AFTER_S = 2  # what a 503 tells clients while the store is down


class StoreError(FewshotError):
    """The store cannot do what was asked."""


class NotFoundError(StoreError):
    """A workspace, class or example does not exist (in this workspace)."""


class ConflictError(StoreError):
    """A change conflicts with what is stored (e.g. a duplicate class label)."""


class InvalidInput(StoreError):
    """A value the store cannot hold (e.g. text with a NUL character)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or cannot write right now: a server fault (HTTP 503).
    The message is safe to show to clients: no URL, user or password."""

    def __init__(self, message: str, retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelMismatchError(StoreError):
    """The store was filled by a different model; its embeddings are meaningless to this one."""


@dataclass(frozen=True)
class ModelIdentity:
    embedding_dim: int
    bundle_id: str


@dataclass(frozen=True)
class WorkspaceRecord:
    id: str
    name: str
    key_hash: str
    settings: dict[str, Any]
    version: int
    bundle_id: str = ""  # the model whose embeddings the workspace holds (fixed at creation)


@dataclass(frozen=True)
class ClassRecord:
    id: str
    label: str
    version: int
    n_examples: int


@dataclass(frozen=True)
class NewExample:
    """embedding: float32 (D,); thumbnail_png: a small PNG shown when explaining predictions."""

    embedding: np.ndarray
    thumbnail_png: bytes


@dataclass(frozen=True)
class ExampleSet:
    """All examples of some classes: ids (E,), class_ids (E,), embeddings float32 (E, D)."""

    ids: list[str]
    class_ids: list[str]
    embeddings: np.ndarray


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


_ID = re.compile(r"(ws|cls|ex)_[0-9a-f]{16}")


def is_id(value: str, prefix: str) -> bool:
    """Whether `value` has the shape of an id made by `new_id(prefix)` (checked before any query)."""
    m = _ID.fullmatch(value)
    return m is not None and m.group(1) == prefix


@dataclass(frozen=True)
class WorkspaceChanges:
    version: int
    classes: dict[str, tuple[str, int]]  # every class: id -> (label, version)
    changed: list[str]  # classes new or changed since the caller's view
    examples: ExampleSet  # the examples of `changed`
