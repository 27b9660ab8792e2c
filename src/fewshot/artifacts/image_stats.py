"""Cheap statistics of one image, taken on a small RGB copy before conversion to the model's mode:
colourfulness (Hasler & Süsstrunk, "Measuring colourfulness in natural images", SPIE 2003), mean
intensity, contrast, plain-background share and mid-tone share. The training domain keeps their
quantiles (`fewshot.artifacts.domain`); the service takes an upload's with
`image_statistics(small_rgb(img, summary.stats_side))`."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from fewshot.data.imageio import normalise_mode, open_image, shrink_oriented

STATS_SIDE = 32  # the small RGB copy's longest side (as the service's upload preview)
STATS_MAX_SIDE = 64  # image_statistics refuses larger copies (it must stay well under 1 ms)
LUMA = np.array([0.299, 0.587, 0.114], np.float32) / np.float32(255.0)  # ITU-R 601, as Pillow's "L"


@dataclass(frozen=True)
class ImageStats:
    """Cheap statistics of one upload, on a small RGB copy taken before mode conversion. Field
    order is the order of `DomainVerdict.reasons` (the most telling first)."""

    colourfulness: float  # Hasler & Süsstrunk M3 on 0..255 RGB: 0 gray, < 15 "not colourful"
    midtone_fraction: float  # share of pixels with luma in (0.25, 0.75): few in ink on paper
    background_fraction: float  # share of pixels in the most common of 16 luma levels
    mean_intensity: float  # mean luma, 0 (black) .. 1 (white)
    contrast: float  # std of luma, 0 .. 0.5

    def as_array(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in STAT_NAMES], np.float64)


STAT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(ImageStats))


def _check_small_rgb(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise ValueError(f"image_statistics needs uint8 (H, W, 3) RGB; got {img.dtype} {img.shape}; "
                         "make it with fewshot.artifacts.domain.small_rgb(pil_image)")
    if max(img.shape[:2]) > STATS_MAX_SIDE:
        raise ValueError(f"image_statistics takes at most {STATS_MAX_SIDE} px a side (it must stay "
                         f"well under 1 ms); got {img.shape[1]}x{img.shape[0]}; use small_rgb(pil_image)")


def image_statistics(img_rgb_u8: np.ndarray) -> ImageStats:
    """uint8 (H, W, 3), H, W <= 64 (`small_rgb`) -> ImageStats (about 0.1 ms at 64 px)."""
    _check_small_rgb(img_rgb_u8)
    x = img_rgb_u8.reshape(-1, 3).astype(np.float32)
    rg = x[:, 0] - x[:, 1]
    yb = 0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]
    colourfulness = math.sqrt(rg.var() + yb.var()) + 0.3 * math.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    luma = x @ LUMA  # (H * W,) in [0, 1]
    levels = np.bincount(np.minimum((luma * 16).astype(np.intp), 15), minlength=16)
    return ImageStats(
        colourfulness=float(colourfulness), mean_intensity=float(luma.mean()), contrast=float(luma.std()),
        background_fraction=float(levels.max() / luma.size),
        midtone_fraction=float(np.count_nonzero((luma > 0.25) & (luma < 0.75)) / luma.size),
    )


def small_rgb(img: Image.Image, max_side: int = STATS_SIDE) -> np.ndarray:
    """An opened upload (any Pillow mode; alpha onto white as in decoding) -> uint8 (h, w, 3),
    at most `max_side` px a side; the copy `image_statistics` expects."""
    t = normalise_mode(shrink_oriented(img, max_side, keep_aspect=True), "RGB")  # strip-wise reduce: bounded cost
    t.thumbnail((max_side, max_side))
    return np.asarray(t, dtype=np.uint8)


def upload_statistics(data: bytes, *, name: str = "image", side: int = STATS_SIDE) -> ImageStats:
    """Image file bytes -> ImageStats, as the service computes them (for training originals)."""
    return image_statistics(small_rgb(open_image(data, name=name), side))


def model_image_statistics(images_u8: np.ndarray) -> list[ImageStats]:
    """Statistics of model inputs uint8 (N, C, H, W), when the original files are not at hand.
    They cannot see colour the conversion to "L" removed: prefer the originals (`small_rgb`)."""
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, 1 or 3, H, W) model inputs; got {images_u8.dtype} {images_u8.shape}")
    hwc = np.repeat(images_u8, 3 // images_u8.shape[1], axis=1).transpose(0, 2, 3, 1)
    if max(hwc.shape[1:3]) > STATS_SIDE:
        return [image_statistics(small_rgb(Image.fromarray(np.ascontiguousarray(x)))) for x in hwc]
    return [image_statistics(np.ascontiguousarray(x)) for x in hwc]
