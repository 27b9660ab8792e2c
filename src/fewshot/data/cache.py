"""The packed cache: decoded, resized uint8 images in one memory-mapped file plus a JSON index.

Layout of a cache directory::

    <dir>/images.u8     raw uint8, shape (n_images, C, H, W), classes stored contiguously
    <dir>/index.json    format version, preprocessing, domains, classes (start, count),
                        image -> source file, per-image content hashes, source fingerprint

Writes are atomic: everything goes to a sibling temporary directory which is renamed into place
only once complete, and `index.json` (written last, fsynced) carries `"complete": true`. A killed
writer therefore never leaves a directory that `PackedCache.open` accepts.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot import CACHE_FORMAT_VERSION, __version__
from fewshot.data.imageio import Preprocessing
from fewshot.errors import CacheError
from fewshot.io import replace_dir

INDEX_NAME = "index.json"
IMAGES_NAME = "images.u8"


@dataclass(frozen=True)
class ClassInfo:
    """One class: its images are rows `start .. start + count` of the cache."""

    name: str  # unique key, e.g. "Latin/character01"
    domain: str  # knowledge domain, e.g. "Latin"
    subset: str  # source subset, e.g. "background" / "evaluation" / "" for a plain folder
    start: int
    count: int


class PackedCache:
    """Read side of the packed cache. `images` is a read-only memmap of shape (N, C, H, W)."""

    def __init__(self, path: Path, index: dict[str, Any], images: np.ndarray) -> None:
        self.path = path
        self.index = index
        self.images = images
        self.preprocessing = Preprocessing.from_dict(index["preprocessing"])
        self.classes: tuple[ClassInfo, ...] = tuple(ClassInfo(**c) for c in index["classes"])
        self.domains: tuple[str, ...] = tuple(index["domains"])
        self.files: list[str] = index["files"]
        self.fingerprint: str = index["fingerprint"]
        self._by_name = {c.name: i for i, c in enumerate(self.classes)}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> PackedCache:
        path = Path(path)
        index_path = path / INDEX_NAME
        if not index_path.is_file():
            raise CacheError(
                f"no packed cache at {path} (missing {INDEX_NAME}); run `fewshot prepare` to build it"
            )
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"cache index {index_path} is unreadable ({exc}); delete {path} and re-run `fewshot prepare`") from exc
        version = index.get("format_version")
        if version != CACHE_FORMAT_VERSION:
            raise CacheError(
                f"cache {path} has format version {version!r} but this fewshot {__version__} reads "
                f"version {CACHE_FORMAT_VERSION}; re-run `fewshot prepare` to rebuild it"
            )
        if not index.get("complete"):
            raise CacheError(f"cache {path} is incomplete (a prepare was interrupted); re-run `fewshot prepare`")
        shape = tuple(index["shape"])
        images_path = path / IMAGES_NAME
        expected = int(np.prod(shape))
        if not images_path.is_file() or images_path.stat().st_size != expected:
            raise CacheError(
                f"cache {path}: {IMAGES_NAME} should hold {expected} bytes for shape {shape}; "
                "it is missing or truncated. Delete the folder and re-run `fewshot prepare`"
            )
        images = np.memmap(images_path, dtype=np.uint8, mode="r", shape=shape)
        return cls(path, index, images)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return c, h, w

    def class_id(self, name: str) -> int:
        try:
            return self._by_name[name]
        except KeyError:
            raise CacheError(f"class {name!r} is not in cache {self.path}") from None

    def class_images(self, class_id: int) -> np.ndarray:
        c = self.classes[class_id]
        return self.images[c.start : c.start + c.count]

    def counts(self) -> np.ndarray:
        return np.array([c.count for c in self.classes], dtype=np.int64)

    def load_into_memory(self) -> PackedCache:
        """A copy whose images live in RAM (fast random access; 32k Omniglot images = 25 MB)."""
        return PackedCache(self.path, self.index, np.ascontiguousarray(self.images))

    def content_hashes(self) -> list[str]:
        return list(self.index.get("content_hashes", []))


def write_cache(
    path: str | os.PathLike[str],
    images: np.ndarray,
    classes: Sequence[ClassInfo],
    files: Sequence[str],
    preprocessing: Preprocessing,
    fingerprint: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a cache to `path` (replacing an older one there). Returns `path`.

    `images` is uint8 (N, C, H, W) with classes contiguous as described by `classes`.
    """
    path = Path(path)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CacheError(f"cache images must be uint8 (N, C, H, W); got {images.dtype} {images.shape}")
    n = images.shape[0]
    if len(files) != n:
        raise CacheError(f"{len(files)} file names for {n} images")
    covered = sum(c.count for c in classes)
    if covered != n:
        raise CacheError(f"classes cover {covered} images but the array holds {n}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with open(tmp / IMAGES_NAME, "wb") as fh:
            fh.write(np.ascontiguousarray(images).data)  # the buffer, not a bytes copy (60k RGB 84x84: 1.3 GB)
            fh.flush()
            os.fsync(fh.fileno())
        domains = sorted({c.domain for c in classes})
        index: dict[str, Any] = {
            "format_version": CACHE_FORMAT_VERSION,
            "fewshot_version": __version__,
            "preprocessing": preprocessing.to_dict(),
            "shape": list(images.shape),
            "fingerprint": fingerprint,
            "domains": domains,
            "classes": [asdict(c) for c in classes],
            "files": list(files),
            **(extra or {}),
            "complete": True,
        }
        with open(tmp / INDEX_NAME, "w", encoding="utf-8") as fh:
            json.dump(index, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, path)
