"""Episode descriptions -> tensors, read from the packed cache; plus optional augmentations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fewshot.data.cache import PackedCache
from fewshot.data.imageio import Preprocessing, model_input
from fewshot.episodes.sampling import ClassPool, EpisodeDescription
from fewshot.episodes.types import Episode
from fewshot.errors import EpisodeError


class SplitLike(Protocol):
    name: str
    class_ids: np.ndarray
    rotations: np.ndarray


def pool_from_split(cache: PackedCache, split: SplitLike, *, add_rotations: bool = False) -> ClassPool:
    """The class pool of a split. `add_rotations` turns every class into four rotation classes."""
    ids = np.asarray(split.class_ids, dtype=np.int64)
    if ids.size == 0:
        raise EpisodeError(f"split {split.name!r} has no classes; check the split scheme and the data")
    starts = np.array([cache.classes[i].start for i in ids], dtype=np.int64)
    counts = np.array([cache.classes[i].count for i in ids], dtype=np.int64)
    names = cache.domains
    lookup = {d: j for j, d in enumerate(names)}
    domains = np.array([lookup[cache.classes[i].domain] for i in ids], dtype=np.int64)
    pool = ClassPool(ids, np.asarray(split.rotations, dtype=np.int64) % 4, counts, starts, domains, names)
    return _unique_pairs(pool.with_rotations()) if add_rotations else pool


def _unique_pairs(pool: ClassPool) -> ClassPool:
    """Drop repeated (class, rotation) pairs (a split that already lists rotations, like Vinyals')."""
    _, first = np.unique(np.stack([pool.class_ids, pool.rotations], axis=1), axis=0, return_index=True)
    keep = np.sort(first)
    return ClassPool(pool.class_ids[keep], pool.rotations[keep], pool.counts[keep], pool.starts[keep],
                     pool.domains[keep], pool.domain_names)


@dataclass(frozen=True)
class Augment:
    """Training-time augmentations. `crop_pad`: random crops after zero/edge padding by this many
    pixels; `hflip`: random horizontal flips (natural images only, never for characters)."""

    crop_pad: int = 0
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.hflip


def rotate(images: np.ndarray, quarter_turns: np.ndarray) -> np.ndarray:
    """Rotate each image (n, C, H, W) counter-clockwise by its own number of quarter turns."""
    out = images.copy() if np.any(quarter_turns) else images
    for k in (1, 2, 3):
        mask = quarter_turns == k
        if mask.any():
            out[mask] = np.rot90(images[mask], k=k, axes=(2, 3))
    return out


def augment(images: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Random crop (with edge padding) and horizontal flip per image, driven by `rng`."""
    n, h, w = int(images.shape[0]), int(images.shape[2]), int(images.shape[3])
    out = images
    if aug.crop_pad > 0:
        p = aug.crop_pad
        padded = np.pad(images, ((0, 0), (0, 0), (p, p), (p, p)), mode="edge")
        dy = [int(v) for v in rng.integers(0, 2 * p + 1, size=(n,))]
        dx = [int(v) for v in rng.integers(0, 2 * p + 1, size=(n,))]
        out = np.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    if aug.hflip:
        flip = rng.random(n) < 0.5
        out = out.copy() if out is images else out
        out[flip] = out[flip][..., ::-1]
    return out


def load_rows(cache: PackedCache, rows: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """uint8 (n, C, H, W) of the given cache rows, each rotated by its quarter turns."""
    return rotate(np.asarray(cache.images[rows]), rotations)


def to_tensor(images_u8: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """uint8 (n, C, H, W) -> the model's float32 input under `pre` (`fewshot.data.imageio.model_input`)."""
    return torch.from_numpy(model_input(np.ascontiguousarray(images_u8), pre))


def materialise(
    cache: PackedCache,
    desc: EpisodeDescription,
    *,
    aug: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> Episode:
    """Tensors for one description: support (n_way*n_shot, C, H, W) and query, labels 0..n_way-1;
    images are the model input under the cache's preprocessing (`to_tensor`)."""
    rows = np.concatenate([desc.support_rows, desc.query_rows])
    labels = np.concatenate([desc.support_labels, desc.query_labels])
    images = load_rows(cache, rows, desc.rotations[labels])
    if aug is not None and aug.active:
        if rng is None:
            raise EpisodeError("augmentation needs an explicit rng")
        images = augment(images, aug, rng)
    x = to_tensor(images, cache.preprocessing)
    n_s = desc.support_rows.size
    y = torch.from_numpy(labels)
    return Episode(
        support_x=x[:n_s],
        support_y=y[:n_s],
        query_x=x[n_s:],
        query_y=y[n_s:],
        class_ids=torch.from_numpy(desc.class_ids),
        rotations=torch.from_numpy(desc.rotations),
    )
