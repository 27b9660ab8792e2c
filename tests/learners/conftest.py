"""Fixtures over the synthetic data in learner_data.py (a uniquely named module: `import conftest`
is ambiguous across test folders)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from learner_data import EpisodeFactory, class_bank, make_episode

from fewshot.backbones import create_backbone
from fewshot.episodes.types import Episode


@pytest.fixture
def bank() -> torch.Tensor:
    return class_bank()


@pytest.fixture
def episodes(bank: torch.Tensor) -> EpisodeFactory:
    """episodes(n, seed=..., **shape) -> list of n episodes from a seeded generator."""

    def make(n: int, seed: int = 0, **kw: int | float) -> list[Episode]:
        g = torch.Generator().manual_seed(seed)
        return [make_episode(bank, g, **kw) for _ in range(n)]  # type: ignore[arg-type]

    return make


@pytest.fixture
def small_conv4() -> Callable[..., torch.nn.Module]:
    """small_conv4(seed) -> a 16-channel Conv-4 for 28x28 grey images, seeded initialisation."""

    def make(seed: int = 0) -> torch.nn.Module:
        return create_backbone("conv4", in_channels=1, image_size=28, width=0.25,
                               generator=torch.Generator().manual_seed(seed))

    return make
