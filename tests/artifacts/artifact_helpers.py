"""Helpers for the artifact tests: tiny seeded Conv-4 bundles (28x28 grayscale), image-like samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewshot.artifacts import export_bundle
from fewshot.backbones import create_backbone
from fewshot.data.imageio import Preprocessing


def sample_images(n: int = 8, seed: int = 0) -> np.ndarray:
    """Blobby grayscale images (smooth, image-like), uint8 (n, 1, 28, 28)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    out = np.empty((n, 1, 28, 28), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(6, 22), rng.uniform(6, 22), rng.uniform(3, 9)
        out[i, 0] = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 0, 255)
    return out


def tiny_backbone(seed: int = 0) -> torch.nn.Module:
    return create_backbone("conv4", in_channels=1, image_size=28, generator=torch.Generator().manual_seed(seed))


def export_tiny(out: Path, backbone: torch.nn.Module | None = None, **kw: object) -> Path:
    args: dict = dict(preprocessing=Preprocessing("L", 28), source={"run": "test"}, metrics={"acc": 0.0},
                      data_fingerprint="synthetic-v1", calibration=None, sample_images=sample_images())
    args.update(kw)
    return export_bundle(backbone if backbone is not None else tiny_backbone(), out, **args)
