"""Tiny synthetic few-shot data made in the tests: each class is a fixed random blocky pattern;
images are the pattern plus noise and a random shift, so classes are learnable but not trivial."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fewshot.episodes.types import Episode

EpisodeFactory = Callable[..., Episode]


def class_bank(
    n_classes: int = 24, channels: int = 1, size: int = 28, seed: int = 0
) -> torch.Tensor:
    """(n_classes, C, size, size) patterns in [0, 1]: 7x7 random binary grids upsampled."""
    g = torch.Generator().manual_seed(seed)
    grid = (torch.rand(n_classes, channels, 7, 7, generator=g) > 0.5).float()
    return torch.nn.functional.interpolate(grid, size=(size, size), mode="nearest")


def images(
    bank: torch.Tensor, classes: torch.Tensor, n: int, g: torch.Generator, noise: float
) -> torch.Tensor:
    """n noisy, shifted images per class -> (len(classes) * n, C, H, W), class-major order."""
    x = bank[classes].repeat_interleave(n, dim=0)
    shifts = torch.randint(-2, 3, (x.shape[0], 2), generator=g)
    x = torch.stack(
        [torch.roll(img, (int(a), int(b)), dims=(1, 2)) for img, (a, b) in zip(x, shifts)]
    )
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)


def make_episode(
    bank: torch.Tensor,
    g: torch.Generator,
    n_way: int = 5,
    n_shot: int = 1,
    n_query: int = 4,
    noise: float = 0.5,
) -> Episode:
    classes = torch.randperm(bank.shape[0], generator=g)[:n_way]
    labels = torch.arange(n_way)
    return Episode(
        support_x=images(bank, classes, n_shot, g, noise),
        support_y=labels.repeat_interleave(n_shot),
        query_x=images(bank, classes, n_query, g, noise),
        query_y=labels.repeat_interleave(n_query),
        class_ids=classes,
        rotations=torch.zeros(n_way, dtype=torch.long),
    )


