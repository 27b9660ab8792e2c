"""Helpers for multi-model and standalone-export tests: a small RGB bundle named "photos", RGB images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from service_helpers import class_images

from fewshot.artifacts import export_bundle
from fewshot.backbones import create_backbone
from fewshot.data.imageio import Preprocessing

RGB_SIDE = 32


def rgb_class_images(seed: int, n: int, side: int = RGB_SIDE) -> np.ndarray:
    """n noisy variants of one random colour image: uint8 (n, 3, side, side), a channel per seed."""
    return np.concatenate([class_images(1000 + 3 * seed + ch, n, side) for ch in range(3)], axis=1)


def rgb_png(arr: np.ndarray) -> bytes:
    """(3, H, W) uint8 -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0))).save(buf, format="PNG")
    return buf.getvalue()


def make_rgb_bundle(out: Path, seed: int = 2) -> Path:
    """An untrained Conv-4 (32-d embeddings) on 32x32 RGB with ImageNet-style mean/std, manifest name "photos"."""
    backbone = create_backbone("conv4", in_channels=3, image_size=RGB_SIDE, hidden=8,
                               generator=torch.Generator().manual_seed(seed))
    pre = Preprocessing("RGB", RGB_SIDE, resample="bilinear", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    samples = np.concatenate([rgb_class_images(s, 2) for s in range(4)])
    return export_bundle(backbone, out, preprocessing=pre, source={"name": "photos", "seed": seed},
                         metrics={"note": "untrained"}, data_fingerprint="synthetic", calibration=None,
                         sample_images=samples)
