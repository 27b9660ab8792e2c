"""Episodes through a standard `torch.utils.data.DataLoader`, workers included.

`EpisodeDataset[i]` is episode `i` of its seed: the description comes from `episode_rng(seed, i)`,
so the stream is identical with 0 or 8 workers, on any OS (workers start with spawn: the dataset
pickles the cache path, not the array), and after a resume at any index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from fewshot.data.cache import PackedCache
from fewshot.episodes.materialise import Augment, materialise
from fewshot.episodes.sampling import (
    ClassPool,
    DomainMode,
    EpisodeDescription,
    EpisodeSpec,
    VariableSpec,
    describe_episode,
    describe_variable_episode,
    episode_rng,
)
from fewshot.episodes.types import Episode


class EpisodeDataset(Dataset[Episode]):
    """Map-style dataset of episodes indexed by integer; deterministic in (seed, index)."""

    def __init__(
        self,
        cache: PackedCache,
        pool: ClassPool,
        spec: EpisodeSpec | VariableSpec,
        *,
        seed: int = 0,
        mode: DomainMode = "any",
        aug: Augment | None = None,
        length: int = 1_000_000_000,
    ) -> None:
        self.cache = cache
        self.pool = pool
        self.spec = spec
        self.seed = seed
        self.mode: DomainMode = mode
        self.aug = aug
        self.length = length

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> tuple[EpisodeDescription, np.random.Generator]:
        rng = episode_rng(self.seed, index)
        if isinstance(self.spec, VariableSpec):
            return describe_variable_episode(self.pool, self.spec, rng, self.mode), rng
        return describe_episode(self.pool, self.spec, rng, self.mode), rng

    def __getitem__(self, index: int) -> Episode:
        desc, rng = self.describe(index)
        return materialise(self.cache, desc, aug=self.aug, rng=rng)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["cache"] = str(self.cache.path)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["cache"] = PackedCache.open(Path(state["cache"]))
        self.__dict__.update(state)


class RangeSampler(Sampler[int]):
    """Yields episode indices start, start+1, ...; `start` lets a resumed run continue the stream."""

    def __init__(self, start: int, count: int) -> None:
        self.start = start
        self.count = count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.start + self.count))

    def __len__(self) -> int:
        return self.count


def _identity(x: Any) -> Any:
    return x


class IndexSampler(Sampler[int]):
    """Yields the given episode indices in order (a rank's share of a distributed run's stream)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def episode_loader(
    dataset: EpisodeDataset, *, start: int = 0, count: int = 1000, num_workers: int = 0,
    indices: Sequence[int] | None = None,
) -> DataLoader[Episode]:
    """A DataLoader yielding `Episode`s index `start..start+count-1` (one episode per item), or
    exactly `indices` when given."""
    sampler: Sampler[int] = RangeSampler(start, count) if indices is None else IndexSampler(indices)
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        multiprocessing_context="spawn" if num_workers > 0 else None,
        persistent_workers=False,
    )
