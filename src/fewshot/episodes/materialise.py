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
    """Training-time augmentations, all drawn from the rng passed to `augment`.

    crop_pad: random crops after edge padding by this many pixels.
    hflip: random horizontal flips (natural images only, never for characters).
    rrc_scale, rrc_ratio: random resized crop (torchvision's RandomResizedCrop semantics): a box of
      area fraction in `rrc_scale` and aspect ratio (w / h, log-uniform) in `rrc_ratio`, resized back
      to the image size (bilinear); None: off.
    color_jitter: brightness, contrast and saturation factors each drawn from [1 - v, 1 + v]
      (RGB only); 0: off.
    hue_jitter: a hue rotation of up to +-v turns (RGB only, in YIQ space); 0: off.
    affine: Koch, Zemel & Salakhutdinov (2015)'s random affine distortions for characters
      (`random_affine`); False: off.
    """

    crop_pad: int = 0
    hflip: bool = False
    rrc_scale: tuple[float, float] | None = None
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.0
    hue_jitter: float = 0.0
    affine: bool = False

    def __post_init__(self) -> None:
        if self.rrc_scale is not None and not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise EpisodeError(f"rrc_scale {self.rrc_scale} must be (low, high) with 0 < low <= high <= 1, "
                               "e.g. (0.08, 1.0)")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise EpisodeError(f"rrc_ratio {self.rrc_ratio} must be (low, high) with 0 < low <= high, e.g. (0.75, 1.333)")
        if not 0 <= self.color_jitter < 1:
            raise EpisodeError(f"color_jitter {self.color_jitter} must be in [0, 1), e.g. 0.4")
        if not 0 <= self.hue_jitter <= 0.5:
            raise EpisodeError(f"hue_jitter {self.hue_jitter} must be in [0, 0.5], e.g. 0.1")

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.hflip or self.rrc_scale is not None or self.colour or self.affine

    @property
    def colour(self) -> bool:
        return self.color_jitter > 0 or self.hue_jitter > 0


def rotate(images: np.ndarray, quarter_turns: np.ndarray) -> np.ndarray:
    """Rotate each image (n, C, H, W) counter-clockwise by its own number of quarter turns."""
    out = images.copy() if np.any(quarter_turns) else images
    for k in (1, 2, 3):
        mask = quarter_turns == k
        if mask.any():
            out[mask] = np.rot90(images[mask], k=k, axes=(2, 3))
    return out


def augment(images: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, C, H, W) -> augmented uint8 (n, C, H, W), driven only by `rng`: random affine
    distortion, random crop (edge padding), random resized crop, horizontal flip, colour jitter, in
    that order."""
    n, h, w = int(images.shape[0]), int(images.shape[2]), int(images.shape[3])
    if aug.colour and images.shape[1] != 3:
        raise EpisodeError(f"color_jitter / hue_jitter need RGB images; these have {images.shape[1]} channel(s); "
                           "set train.color_jitter and train.hue_jitter to 0 for grayscale data")
    out = random_affine(images, rng) if aug.affine else images
    if aug.crop_pad > 0:
        p = aug.crop_pad
        padded = np.pad(out, ((0, 0), (0, 0), (p, p), (p, p)), mode="edge")
        dy = [int(v) for v in rng.integers(0, 2 * p + 1, size=(n,))]
        dx = [int(v) for v in rng.integers(0, 2 * p + 1, size=(n,))]
        out = np.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(zip(dy, dx))])
    if aug.rrc_scale is not None:
        out = resized_crop(out, crop_boxes(n, h, w, aug.rrc_scale, aug.rrc_ratio, rng))
    if aug.hflip:
        flip = rng.random(n) < 0.5
        out = out.copy() if out is images else out
        out[flip] = out[flip][..., ::-1]
    if aug.colour:
        out = colour_jitter(out, aug.color_jitter, aug.hue_jitter, rng)
    return out


# Koch et al. 2015, section 3.3 (105 x 105 characters): rotation, shear, scale and translation,
# each component present with probability 0.5; translation scaled here to the image's side
AFFINE_ROTATION_DEG = 10.0
AFFINE_SHEAR = 0.3
AFFINE_SCALE = (0.8, 1.2)
AFFINE_TRANSLATE = 2.0 / 105.0  # of the side


def affine_matrices(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2, 3) sampling transforms in `affine_grid`'s normalised coordinates, Koch et al.'s
    distribution: rotation U(-10, 10) degrees, shears U(-0.3, 0.3), scales U(0.8, 1.2) and
    translations U(-2, 2) pixels at 105 px, each of the four present with probability 0.5."""
    present = rng.random((n, 4)) < 0.5
    theta = np.where(present[:, 0], rng.uniform(-1, 1, n) * np.deg2rad(AFFINE_ROTATION_DEG), 0.0)
    shear = np.where(present[:, 1:2], rng.uniform(-AFFINE_SHEAR, AFFINE_SHEAR, (n, 2)), 0.0)
    scale = np.where(present[:, 2:3], rng.uniform(*AFFINE_SCALE, (n, 2)), 1.0)
    shift = np.where(present[:, 3:4], rng.uniform(-1, 1, (n, 2)) * AFFINE_TRANSLATE * 2, 0.0)  # normalised: side = 2
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)  # (n, 2, 2)
    sh = np.stack([np.stack([np.ones(n), shear[:, 0]], -1), np.stack([shear[:, 1], np.ones(n)], -1)], 1)
    a = rot @ sh @ (scale[:, :, None] * np.eye(2)[None])
    return np.concatenate([a, shift[:, :, None]], axis=2)


def random_affine(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, C, H, W) -> each image under its own Koch et al. affine distortion (`affine_matrices`;
    bilinear, the border's value outside the image: a character's background), uint8."""
    n, _, h, w = images.shape
    return warp(images, affine_matrices(n, h, w, rng))


def warp(images: np.ndarray, mats: np.ndarray) -> np.ndarray:
    """uint8 (n, C, H, W), (n, 2, 3) transforms -> output pixel at normalised position p samples the
    input at mats @ [p, 1] (`affine_grid` / `grid_sample`, bilinear, border values outside), uint8."""
    n, c, h, w = images.shape
    grid = torch.nn.functional.affine_grid(torch.from_numpy(mats).float(), [n, c, h, w], align_corners=False)
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


def crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator, tries: int = 10) -> np.ndarray:
    """(n, 4) float boxes (y0, x0, height, width) as torchvision's RandomResizedCrop draws them: up to
    `tries` draws of area fraction ~ U(scale) and log aspect ~ U(log ratio), the first that fits;
    otherwise the largest centred box whose aspect is clamped into `ratio`."""
    area = rng.uniform(scale[0], scale[1], (n, tries)) * (h * w)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, tries)))
    bw, bh = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
    fits = (bw >= 1) & (bh >= 1) & (bw <= w) & (bh <= h)
    first = fits.argmax(1)
    ok = fits[np.arange(n), first]
    bw, bh = bw[np.arange(n), first], bh[np.arange(n), first]
    u = rng.random((n, 2))  # position inside the image, used for the boxes that fit
    y0, x0 = np.floor(u[:, 0] * (h - bh + 1)), np.floor(u[:, 1] * (w - bw + 1))
    if not ok.all():  # the fallback: the whole image, aspect clamped into ratio, centred
        fw = round(h * ratio[1]) if w / h > ratio[1] else w
        fh = round(w / ratio[0]) if w / h < ratio[0] else h
        bw, bh = np.where(ok, bw, fw), np.where(ok, bh, fh)
        y0, x0 = np.where(ok, y0, (h - bh) // 2), np.where(ok, x0, (w - bw) // 2)
    return np.stack([y0, x0, bh, bw], axis=1)


def resized_crop(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """uint8 (n, C, H, W) and (n, 4) boxes (y0, x0, height, width) -> each box resized to H x W
    (bilinear, one batched `grid_sample`; samples stay inside the box, as crop-then-resize), uint8."""
    n, _, h, w = images.shape
    y0, x0, bh, bw = (torch.from_numpy(boxes[:, i]).float()[:, None] for i in range(4))
    # pixel-centre sample positions of each output pixel inside its box, kept within the box's pixels
    xs = torch.minimum(torch.maximum(x0 + (torch.arange(w) + 0.5) * bw / w - 0.5, x0), x0 + bw - 1)  # (n, w)
    ys = torch.minimum(torch.maximum(y0 + (torch.arange(h) + 0.5) * bh / h - 0.5, y0), y0 + bh - 1)  # (n, h)
    grid = torch.stack([((xs + 0.5) / w * 2 - 1)[:, None, :].expand(n, h, w),
                        ((ys + 0.5) / h * 2 - 1)[:, :, None].expand(n, h, w)], dim=-1)  # (n, h, w, 2) as (x, y)
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).numpy()


LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, torchvision's grayscale
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)


def colour_jitter(images: np.ndarray, strength: float, hue: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 3, H, W) -> uint8: brightness (x * b), contrast (blend with the image's mean luma),
    saturation (blend with the per-pixel luma), factors ~ U(1 - strength, 1 + strength) per image, in
    that order (torchvision's ColorJitter draws its order at random); then a hue rotation of
    U(-hue, hue) turns of the chroma plane in YIQ space."""
    n, _, h, w = images.shape
    b, c, s = (rng.uniform(1 - strength, 1 + strength, (n, 1, 1)).astype(np.float32) for _ in range(3))
    x = images.reshape(n, 3, h * w).astype(np.float32)  # (n, 3, P); every step below works in place
    x *= b
    np.clip(x, 0, 255, out=x)
    mean_luma = (LUMA @ x).mean(axis=1)[:, None, None]  # (n, 1, 1)
    x *= c
    x += mean_luma * (1 - c)
    np.clip(x, 0, 255, out=x)
    luma = (LUMA @ x)[:, None, :]  # (n, 1, P)
    x *= s
    x += luma * (1 - s)
    np.clip(x, 0, 255, out=x)
    if hue > 0:
        angle = rng.uniform(-hue, hue, n) * 2 * np.pi
        cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
        rot = np.zeros((n, 3, 3), np.float32)  # rotate (I, Q), keep Y
        rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, cos, -sin, sin, cos
        m = (np.linalg.inv(_RGB_TO_YIQ)[None] @ rot @ _RGB_TO_YIQ[None]).astype(np.float32)  # (n, 3, 3) on RGB
        x = np.clip(m @ x, 0, 255)
    return np.rint(x).astype(np.uint8).reshape(n, 3, h, w)


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
