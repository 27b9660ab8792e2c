"""Plain classification batches over every image of a class pool (for pre-training learners).

Batch `i` of seed `s` is drawn from `episode_rng(s, i)`: reproducible and resumable like episodes.
"""

from __future__ import annotations

import numpy as np
import torch

from fewshot.data.cache import PackedCache
from fewshot.episodes.materialise import Augment, augment, load_rows, to_tensor
from fewshot.episodes.sampling import ClassPool, episode_rng


def describe_batch(pool: ClassPool, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels): `batch_size` images drawn uniformly over all images of the pool; labels are pool indices."""
    cum = np.cumsum(pool.counts)
    flat = rng.integers(0, int(cum[-1]), size=batch_size)
    labels = np.searchsorted(cum, flat, side="right")
    offsets = flat - (cum[labels] - pool.counts[labels])
    return pool.starts[labels] + offsets, labels.astype(np.int64)


def sample_batch(
    cache: PackedCache, pool: ClassPool, batch_size: int, seed: int, index: int, aug: Augment | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (batch_size, C, H, W) model input under the cache's preprocessing; y: (batch_size,) pool-class labels."""
    rng = episode_rng(seed, index)
    rows, labels = describe_batch(pool, batch_size, rng)
    images = load_rows(cache, rows, pool.rotations[labels])
    if aug is not None and aug.active:
        images = augment(images, aug, rng)
    return to_tensor(images, cache.preprocessing), torch.from_numpy(labels)
