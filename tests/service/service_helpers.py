"""Helpers for the service tests: a toy embedder, tiny synthetic images, a tiny real bundle."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewshot.artifacts import export_bundle
from fewshot.artifacts.domain import model_image_statistics, summarise_domain
from fewshot.artifacts.embedders import TorchEmbedder, check_batch
from fewshot.backbones import create_backbone
from fewshot.data.imageio import Preprocessing


class ToyEmbedder:
    """Deterministic numpy embedder (fixed random projection) for fast recogniser/store tests."""

    def __init__(self, dim: int = 16, channels: int = 1, size: int = 28) -> None:
        self.embedding_dim, self.channels, self.size = dim, channels, size
        self.proj = np.random.default_rng(0).standard_normal((channels * size * size, dim)).astype(np.float32)

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        check_batch(images_u8, self.channels, self.size)
        x = images_u8.reshape(len(images_u8), -1).astype(np.float32) / 255.0
        return (x @ self.proj).astype(np.float32)


def class_images(seed: int, n: int, size: int = 28) -> np.ndarray:
    """n noisy variants of one random prototype image: uint8 (n, 1, size, size)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, size, size))
    noise = rng.integers(-20, 21, (n, 1, size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[0] if arr.ndim == 3 else arr).save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_bundle(out: Path, seed: int = 0, hidden: int = 64, calibration: dict | None = None,
                     domain: bool = False) -> Path:
    """An untrained Conv-4 bundle; `domain`: with a domain summary of grayscale noise-pattern images."""
    backbone = create_backbone("conv4", in_channels=1, image_size=28, hidden=hidden,
                               generator=torch.Generator().manual_seed(seed))
    samples = np.concatenate([class_images(s, 2) for s in range(4)])
    summary = None
    if domain:
        train = np.concatenate([class_images(100 + s, 25) for s in range(48)])
        summary = summarise_domain(TorchEmbedder(backbone, Preprocessing("L", 28)), train, model_image_statistics(train),
                                   mode="L", size=28, rng=np.random.default_rng(seed), trained_on="noise patterns",
                                   image_stats_from="model inputs").to_dict()
    return export_bundle(backbone, out, preprocessing=Preprocessing("L", 28), source={"run": "test", "seed": seed},
                         metrics={"note": "untrained"}, data_fingerprint="synthetic", calibration=calibration,
                         sample_images=samples, domain=summary)


def colour_photo_jpeg(side: int = 48, seed: int = 0) -> bytes:
    """A saturated colour 'photo' (smooth colour gradients), as a JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([np.sin(6 * x + rng.uniform(0, 3)), np.cos(5 * y), np.sin(4 * (x + y))], -1)
    buf = io.BytesIO()
    Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
