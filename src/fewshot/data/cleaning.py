"""Cleaning: every input file is kept or dropped with a named reason, and the report says which.

Per file (`inspect_batch`, runs in worker processes): zero_size, not_an_image, truncated,
unreadable, too_small. For sources with split files (`apply_split_rules`, after all files are
inspected): not_in_split (no split file lists it), split_duplicate (identical pixels to an image
kept in an earlier split, train < val < test: the copy in the later split is dropped, so no image
is in two splits). Per class (`apply_class_rules`, last): duplicate (identical full-resolution
pixels within a class; the first file is kept and named), then class_too_small (fewer than
`min_images_per_class` files left; all its files dropped). Identical images in two classes of one
split are kept and reported as warnings (label noise, not leakage).

Exact duplicates compare the full-resolution image after mode conversion, not the resized one:
two drawings that only coincide after downscaling are different data. Omniglot's one known pair
(Braille/character01 0192_03 and 0192_19, both a single dot) is pixel-identical at 105x105, so
0192_19 is dropped as a duplicate of 0192_03. miniImageNet's six validation images that repeat a
training image are dropped as split_duplicate (SOURCES.md lists them). Perceptual hashes (64-bit dHash) are kept per image
for the cross-split near-duplicate warnings in `leakage.check_leakage`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ImageOps, UnidentifiedImageError

from fewshot.data.imageio import Preprocessing, draft_size, normalise_mode, open_image, to_array
from fewshot.errors import ConfigError, DataError, ImageError

KEPT = "kept"
REASONS: tuple[str, ...] = (
    "unreadable",
    "truncated",
    "not_an_image",
    "zero_size",
    "duplicate",
    "too_small",
    "not_in_split",
    "split_duplicate",
    "class_too_small",
)
REPORT_FORMAT = 1
MAX_LISTED_WARNINGS = 20


@dataclass(frozen=True)
class CleaningConfig:
    """What counts as usable data."""

    min_images_per_class: int = 2  # 1 support + 1 query is the least an episode can use
    min_side: int = 8  # pixels; smaller images are dropped as too_small

    def __post_init__(self) -> None:
        if self.min_images_per_class < 1:
            raise ConfigError(f"min_images_per_class={self.min_images_per_class}; use 1 or more")
        if self.min_side < 1:
            raise ConfigError(f"min_side={self.min_side}; use 1 or more pixels")

    def to_dict(self) -> dict[str, int]:
        return {"min_images_per_class": self.min_images_per_class, "min_side": self.min_side}


# --------------------------------------------------------------------------- per file


@dataclass
class InspectedBatch:
    """Results for a batch of files, in input order. `images` rows of dropped files are zero."""

    status: list[str]  # KEPT or a reason
    detail: list[str]
    content_hash: list[str]  # sha256 hex of full-resolution pixels ("" when dropped)
    phash: np.ndarray  # (n,) uint64 dHash
    images: np.ndarray  # (n, C, H, W) uint8


def inspect_batch(
    datas: Sequence[bytes], names: Sequence[str], pre: Preprocessing, min_side: int
) -> InspectedBatch:
    """Decode, check and resize a batch of files. Top-level so spawn-started workers can run it."""
    n = len(datas)
    out = InspectedBatch(
        status=[KEPT] * n,
        detail=[""] * n,
        content_hash=[""] * n,
        phash=np.zeros(n, dtype=np.uint64),
        images=np.zeros((n, pre.channels, pre.size, pre.size), dtype=np.uint8),
    )
    for i, (data, name) in enumerate(zip(datas, names)):
        reason, detail, img = _decode_checked(data, name, min_side, draft_size(pre))
        if img is None:
            out.status[i], out.detail[i] = reason, detail
            continue
        full = normalise_mode(img, pre.mode)  # (H, W) or (H, W, 3) at full resolution
        pixels = np.asarray(full, dtype=np.uint8)
        out.content_hash[i] = pixel_hash(pixels)
        out.phash[i] = dhash64(pixels)
        if full.size == (pre.size, pre.size):  # already the cache's size (miniImageNet): no resize
            out.images[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        else:
            out.images[i] = to_array(full, pre)
    return out


def _decode_checked(data: bytes, name: str, min_side: int, draft_to: int) -> tuple[str, str, Any]:
    """(reason, detail, None) for a file to drop, or ("", "", oriented image) for a usable one."""
    if len(data) == 0:
        return "zero_size", "file is empty (0 bytes)", None
    try:
        img = open_image(data, name=name, draft_to=draft_to)
    except ImageError as exc:
        return _classify(exc), str(exc), None
    img = ImageOps.exif_transpose(img) or img
    w, h = img.size
    if min(w, h) < min_side:
        return "too_small", f"{w}x{h} pixels; the minimum side is {min_side} (min_side)", None
    return "", "", img


def _classify(exc: ImageError) -> str:
    cause = exc.__cause__
    if isinstance(cause, UnidentifiedImageError) or "is not accepted" in str(exc):
        return "not_an_image"
    if cause is not None and "truncated" in str(cause).lower():
        return "truncated"
    return "unreadable"


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 hex of a uint8 pixel array, its shape included (so 2x8 and 4x4 never collide)."""
    h = hashlib.sha256(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 weights, as Pillow's "L" conversion


def dhash64(pixels: np.ndarray) -> int:
    """64-bit difference hash (Krawetz, "Kind of like that", 2013) of a (H, W[, 3]) uint8 image.

    The image is block-averaged to 8 rows x 9 columns of gray values; bit k is set when a cell is
    brighter than its right neighbour. Similar images differ in few bits (Hamming distance).
    """
    gray = pixels.astype(np.float64)
    if gray.ndim == 3:
        gray = gray @ _LUMA
    reps = (max(1, -(-8 // gray.shape[0])), max(1, -(-9 // gray.shape[1])))
    if reps != (1, 1):  # tiny images: repeat pixels so every cell covers at least one
        gray = np.repeat(np.repeat(gray, reps[0], axis=0), reps[1], axis=1)
    cells = _block_mean(_block_mean(gray, 8, axis=0), 9, axis=1)  # (8, 9)
    bits = (cells[:, :-1] > cells[:, 1:]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def _block_mean(a: np.ndarray, n: int, axis: int) -> np.ndarray:
    starts, sizes = _blocks(int(a.shape[axis]), n, axis)
    return np.add.reduceat(a, starts, axis=axis) / sizes


@functools.lru_cache(maxsize=64)
def _blocks(length: int, n: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """First index and size of `n` near-equal blocks over `length` (sizes shaped to broadcast on `axis`)."""
    edges = np.linspace(0, length, n + 1).astype(np.int64)
    shape = [1, 1]
    shape[axis] = n
    return edges[:-1], np.diff(edges).reshape(shape)


# --------------------------------------------------------------------------- split files


@dataclass(frozen=True)
class SplitDuplicate:
    """An image found in two splits: the copy in `dropped_split` was dropped, `kept` stays."""

    dropped: str  # source id
    dropped_split: str
    kept: str
    kept_split: str


def apply_split_rules(
    subsets: Sequence[str],
    source_ids: Sequence[str],
    status: list[str],
    detail: list[str],
    content_hash: Sequence[str],
    split_order: Sequence[str],
) -> list[SplitDuplicate]:
    """Mark kept files in no split (not_in_split) and copies of an image kept in an earlier split
    (split_duplicate), in place; returns the duplicates. `subsets[i]` is file i's split ("" = none)."""
    rank = {name: k for k, name in enumerate(split_order)}
    files = ", ".join(f"{name}.csv" for name in split_order)
    for i, subset in enumerate(subsets):
        if status[i] == KEPT and subset not in rank:
            status[i] = "not_in_split"
            detail[i] = f"listed in none of the split files ({files}); add it to one, or delete the file"
    first_with: dict[str, int] = {}
    found = []
    for i in sorted((i for i, st in enumerate(status) if st == KEPT), key=lambda i: (rank[subsets[i]], i)):
        kept = first_with.setdefault(content_hash[i], i)
        if subsets[kept] != subsets[i]:
            status[i] = "split_duplicate"
            detail[i] = (f"identical pixels to {source_ids[kept]} in split {subsets[kept]!r} (kept: of an image "
                         f"in two splits, the copy in the earlier split stays)")
            found.append(SplitDuplicate(source_ids[i], subsets[i], source_ids[kept], subsets[kept]))
    return found


# --------------------------------------------------------------------------- per class


def apply_class_rules(
    class_names: Sequence[str],
    source_ids: Sequence[str],
    status: list[str],
    detail: list[str],
    content_hash: Sequence[str],
    min_images_per_class: int,
) -> None:
    """Mark within-class duplicates and too-small classes, in place. Files of a class are contiguous."""
    for idx in _class_groups(class_names):
        first_with: dict[str, int] = {}
        for i in idx:
            if status[i] != KEPT:
                continue
            kept = first_with.setdefault(content_hash[i], i)
            if kept != i:
                status[i] = "duplicate"
                detail[i] = f"identical pixels to {source_ids[kept]} (kept)"
        kept_idx = [i for i in idx if status[i] == KEPT]
        if 0 < len(kept_idx) < min_images_per_class:
            for i in kept_idx:
                status[i] = "class_too_small"
                detail[i] = (
                    f"class {class_names[i]!r} has {len(kept_idx)} usable image(s); "
                    f"min_images_per_class={min_images_per_class}"
                )


def _class_groups(class_names: Sequence[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    last = None
    for i, name in enumerate(class_names):
        if name != last and name in groups:
            raise DataError(f"class {name!r} is not contiguous in the source listing (file #{i})")
        groups.setdefault(name, []).append(i)
        last = name
    return list(groups.values())


def cross_class_duplicates(
    class_names: Sequence[str], source_ids: Sequence[str], status: Sequence[str], content_hash: Sequence[str]
) -> list[str]:
    """Warnings for identical kept images filed under different classes (label noise or leakage)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(status):
        if s == KEPT:
            by_hash[content_hash[i]].append(i)
    out = []
    for idx in by_hash.values():
        if len({class_names[i] for i in idx}) > 1:
            out.append("identical image in several classes: " + ", ".join(source_ids[i] for i in idx))
    return out


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class FileRecord:
    source_id: str
    subset: str
    class_name: str
    status: str  # "kept" or one of REASONS
    detail: str = ""


@dataclass(frozen=True)
class CleaningReport:
    """Every input file, kept or dropped with a reason; plus warnings that dropped nothing."""

    records: tuple[FileRecord, ...]
    warnings: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_files(self) -> int:
        return len(self.records)

    @property
    def n_kept(self) -> int:
        return sum(r.status == KEPT for r in self.records)

    def dropped(self, reason: str | None = None) -> list[FileRecord]:
        return [r for r in self.records if r.status != KEPT and reason in (None, r.status)]

    def counts(self) -> dict[str, dict[str, int]]:
        """{subset: {status: n}} with every status present (zeros included)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            row = out.setdefault(r.subset, dict.fromkeys((KEPT, *REASONS), 0))
            row[r.status] += 1
        return out

    def summary(self) -> dict[str, Any]:
        totals = Counter(r.status for r in self.records)
        return {
            "n_files": self.n_files,
            "n_kept": self.n_kept,
            "by_status": {s: totals.get(s, 0) for s in (KEPT, *REASONS)},
            "by_subset": self.counts(),
            "n_warnings": len(self.warnings),
        }

    def table(self) -> str:
        """Markdown table: rows = kept + reasons, columns = subsets + total."""
        counts = self.counts()
        subsets = sorted(counts)
        head = ["status", *[s or "(none)" for s in subsets], "total"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for status in (KEPT, *REASONS):
            row = [counts[s][status] for s in subsets]
            lines.append(f"| {status} | " + " | ".join(f"{v:,}" for v in [*row, sum(row)]) + " |")
        cols = [sum(counts[s].values()) for s in subsets]
        lines.append("| **files** | " + " | ".join(f"{v:,}" for v in [*cols, sum(cols)]) + " |")
        for w in self.warnings[:MAX_LISTED_WARNINGS]:
            lines.append(f"\nwarning: {w}")
        if len(self.warnings) > MAX_LISTED_WARNINGS:
            lines.append(f"\n... and {len(self.warnings) - MAX_LISTED_WARNINGS} more warnings")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_format": REPORT_FORMAT,
            "settings": self.settings,
            "summary": self.summary(),
            "warnings": list(self.warnings),
            "records": [[r.source_id, r.subset, r.class_name, r.status, r.detail] for r in self.records],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CleaningReport:
        if d.get("report_format") != REPORT_FORMAT:
            raise DataError(
                f"cleaning report format {d.get('report_format')!r} is not {REPORT_FORMAT}; "
                "re-run `fewshot prepare --force`"
            )
        records = tuple(FileRecord(*r) for r in d["records"])
        return cls(records, tuple(d.get("warnings", ())), dict(d.get("settings", {})))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Atomic JSON write (temporary sibling, fsync, rename)."""
        path = Path(path)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CleaningReport:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cleaning report {path} is unreadable ({exc}); re-run `fewshot prepare --force`") from exc
        return cls.from_dict(d)
