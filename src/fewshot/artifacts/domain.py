"""The training domain of a bundle, and the check that flags images far outside it.

A `DomainSummary` lives in the bundle manifest (a few KB). It records

* what the model takes: mode ("L" / "RGB"), channels, size;
* image statistics of the training images *as uploaded* (`ImageStats`, before conversion to the
  model's mode): quantiles of colourfulness (Hasler & Süsstrunk, "Measuring colourfulness in
  natural images", SPIE 2003), mean intensity, contrast, plain-background share and mid-tone share;
* the embedding distribution of training images: a PCA summary (mean, top-k principal directions
  and their variances, the variance left outside them) and the score of held-out training images,
  so the threshold is calibrated (by default their 99.5th percentile). Given each image's class
  (`groups`), every image is held out once with its whole class (5 folds), as the characters
  users teach are new classes: on the 8,460 Vinyals test characters the quickstart bundle's
  threshold, calibrated on a random fifth of other images of the fitted classes, flagged 0.91%
  (0.80-1.06% when rebuilt with 3 seeds), cross-fitted by class 0.67-0.70%
  (benchmarks/bench_domain_calibration.py; BENCHMARKS.md, "Out-of-domain flag").

`DomainSummary.check(embeddings, stats)` returns one `DomainVerdict` per image. An image is out of
domain when one of its statistics lies outside the training range widened by a tolerance (e.g. a
colour photo sent to a model trained on grayscale characters), when it is blank, or when its
embedding scores above the calibrated threshold. Its `reasons` are written for end users.

Measured on real data (benchmarks/bench_domain.py): the image statistics are what separates
photos from characters for every Omniglot model; the embedding score alone catches between a
third and 95% of photos depending on the model, so it is a second line, not the main one.
The service takes an upload's statistics with `image_statistics(small_rgb(img, summary.stats_side))`
on the opened image, before conversion to the model's mode.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from fewshot.artifacts.embedders import Embedder
from fewshot.data.imageio import normalise_mode, open_image, shrink_oriented
from fewshot.errors import CheckpointError

STATS_SIDE = 32  # the small RGB copy's longest side (as the service's upload preview)
STATS_MAX_SIDE = 64  # image_statistics refuses larger copies (it must stay well under 1 ms)
LUMA = np.array([0.299, 0.587, 0.114], np.float32) / np.float32(255.0)  # ITU-R 601, as Pillow's "L"
STAT_QUANTILES = (0.005, 0.5, 0.995)  # stored per statistic: (low, median, high)
# how far beyond the training range a statistic may go before it is flagged; colourfulness 15 is
# the edge of Hasler & Süsstrunk's "not colourful" band, the others are shares / intensities in [0, 1]
DEFAULT_TOLERANCE = {"colourfulness": 15.0, "midtone_fraction": 0.1, "background_fraction": 0.1,
                     "mean_intensity": 0.1, "contrast": 0.1}
GRAYSCALE_COLOURFULNESS = 5.0  # a training set whose high quantile is below this is grayscale
BLANK_CONTRAST = 0.02  # luma std below ~5 grey levels: one flat colour
METHOD = "pca-max-v1"
STATS_SOURCES = ("originals", "model inputs")
SCORE_QUANTILES = (0.5, 0.9, 0.99, 0.995, 0.999)


# -- image statistics ----------------------------------------------------------------------------
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


# -- embedding summary -----------------------------------------------------------------------------
def _encode(a: np.ndarray, dtype: str) -> dict[str, Any]:
    arr = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(arr.shape), "base64": base64.b64encode(arr.tobytes()).decode("ascii")}


def _decode(d: Any, what: str) -> np.ndarray:
    if not isinstance(d, Mapping) or d.get("dtype") not in ("float16", "float32"):
        raise CheckpointError(f"domain {what} must be {{'dtype': 'float16'|'float32', 'shape', 'base64'}}; "
                              f"got {str(d)[:80]!r}; re-export the bundle")
    try:
        shape = tuple(int(s) for s in d["shape"])
        raw = np.frombuffer(base64.b64decode(d["base64"], validate=True), np.dtype(d["dtype"]).newbyteorder("<"))
        arr = raw.reshape(shape).astype(np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"domain {what} does not decode to its shape {d.get('shape')!r} ({exc}); "
                              "re-export the bundle") from exc
    if not np.isfinite(arr).all():
        raise CheckpointError(f"domain {what} holds non-finite values; re-export the bundle")
    return arr


@dataclass(frozen=True, eq=False)
class EmbeddingSummary:
    """In-domain embeddings as a PCA: `score` is the larger of two distances, each divided by its
    held-out `threshold_quantile` (in-subspace Mahalanobis over `k` principal directions; residual
    off that subspace relative to the variance left there), over `threshold`; > 1 is far."""

    mean: np.ndarray  # (D,) float32
    basis: np.ndarray  # (k, D) principal directions (stored as float16)
    variances: tuple[float, ...]  # (k,) variance along each direction
    residual_variance: float  # total variance outside the k directions
    scales: tuple[float, float]  # held-out quantile of the in-subspace and residual distances
    threshold: float  # held-out `threshold_quantile` of max(in / scale, residual / scale)
    threshold_quantile: float
    score_quantiles: dict[str, float]  # held-out quantiles of `score` ("p99.5" = 1.0 by construction)
    n_fit: int
    n_held_out: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def distances(self, z: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, 2): in-subspace and residual distances (each ~1 in domain, on average)."""
        g = np.asarray(z, np.float64) - self.mean
        p = g @ self.basis.T.astype(np.float64)  # (N, k)
        r = g - p @ self.basis.astype(np.float64)  # (N, D)
        inside = np.sqrt((p ** 2 / np.asarray(self.variances)).mean(axis=1))
        return np.stack([inside, np.sqrt((r ** 2).sum(axis=1) / self.residual_variance)], axis=1)

    def raw_score(self, z: np.ndarray) -> np.ndarray:
        return (self.distances(z) / np.asarray(self.scales)).max(axis=1)  # type: ignore[no-any-return]

    def score(self, z: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) float64; 1.0 is the calibrated edge of the training domain."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}); got {tuple(z.shape)}; embed with the bundle's model")
        return self.raw_score(z) / self.threshold  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "mean": _encode(self.mean, "float32"), "basis": _encode(self.basis, "float16"),
                "variances": list(self.variances), "residual_variance": self.residual_variance,
                "scales": list(self.scales), "threshold": self.threshold,
                "threshold_quantile": self.threshold_quantile, "score_quantiles": dict(self.score_quantiles),
                "n_fit": self.n_fit, "n_held_out": self.n_held_out}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbeddingSummary:
        if d.get("method") != METHOD:
            raise CheckpointError(f"domain embedding method {d.get('method')!r} is unknown (this fewshot reads "
                                  f"{METHOD!r}); re-export the bundle")
        mean, basis = _decode(d.get("mean"), "embedding mean"), _decode(d.get("basis"), "embedding basis")
        try:
            s = cls(mean=mean, basis=basis, variances=tuple(float(v) for v in d["variances"]),
                    residual_variance=float(d["residual_variance"]), scales=(float(d["scales"][0]), float(d["scales"][1])),
                    threshold=float(d["threshold"]), threshold_quantile=float(d["threshold_quantile"]),
                    score_quantiles={str(k): float(v) for k, v in d.get("score_quantiles", {}).items()},
                    n_fit=int(d["n_fit"]), n_held_out=int(d["n_held_out"]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"domain embedding summary is malformed ({exc!r}); re-export the bundle") from exc
        s.validate()
        return s

    def validate(self) -> None:
        k = len(self.variances)
        if self.mean.ndim != 1 or self.basis.shape != (k, self.dim) or k < 1:
            raise CheckpointError(f"domain embedding: mean {self.mean.shape}, basis {self.basis.shape} and "
                                  f"{k} variances do not fit together (want (D,), (k, D), k >= 1); re-export the bundle")
        positive = {"variances": min(self.variances), "residual_variance": self.residual_variance,
                    "scales": min(self.scales), "threshold": self.threshold}
        for name, v in positive.items():
            if not (math.isfinite(v) and v > 0):
                raise CheckpointError(f"domain embedding {name} = {v!r} must be finite and > 0; re-export the bundle")
        if not 0.5 <= self.threshold_quantile < 1:
            raise CheckpointError(f"domain threshold_quantile {self.threshold_quantile!r} must be in [0.5, 1)")


def _quantized_pca(fit: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(N, D) -> mean (D,), basis (k, D) rounded to float16, variances (k,), residual variance."""
    mean = fit.mean(axis=0).astype(np.float32)
    w, v = np.linalg.eigh(np.cov(fit - mean, rowvar=False).reshape(fit.shape[1], fit.shape[1]))
    w, v = np.maximum(w[::-1], 0.0), v[:, ::-1]
    floor = 1e-9 * max(float(w.sum()), 1e-30)
    k = min(components, fit.shape[1] - 1)
    basis = v[:, :k].T.astype(np.float16).astype(np.float32)
    return mean, basis, np.maximum(w[:k], floor), max(float(w[k:].sum()), floor)


def min_training_images(held_out: float = 0.2, threshold_quantile: float = 0.995) -> int:
    """The fewest training images `summarise_domain` can summarise with these settings."""
    return math.ceil(math.ceil(1.0 / (1.0 - threshold_quantile)) / held_out)


def summarise_embeddings(fit: np.ndarray, held: np.ndarray, *, components: int = 16,
                         threshold_quantile: float = 0.995) -> EmbeddingSummary:
    """PCA of `fit` (N, D); scales and threshold calibrated on `held` (M, D), other in-domain images."""
    if fit.ndim != 2 or held.ndim != 2 or fit.shape[1] != held.shape[1] or fit.shape[1] < 2:
        raise ValueError(f"fit and held must be (N, D) and (M, D) with the same D >= 2; got {fit.shape}, {held.shape}")
    min_held = math.ceil(1.0 / (1.0 - threshold_quantile))
    if len(held) < min_held or len(fit) < 2 * components:
        raise ValueError(f"{len(fit)} fit and {len(held)} held-out embeddings are too few: the "
                         f"{100 * threshold_quantile:g}th percentile needs >= {min_held} held out and "
                         f"{components} components >= {2 * components} to fit; pass more training images")
    stub = _pca_summary(fit, components, threshold_quantile)
    return _calibrated(stub, stub.distances(held), threshold_quantile, len(fit), len(held))


def _pca_summary(fit: np.ndarray, components: int, threshold_quantile: float) -> EmbeddingSummary:
    """The PCA of `fit` (N, D), not yet calibrated (scales and threshold 1)."""
    mean, basis, var, resid = _quantized_pca(np.asarray(fit, np.float64), components)
    return EmbeddingSummary(mean, basis, tuple(float(x) for x in var), resid, (1.0, 1.0), 1.0,
                            threshold_quantile, {}, len(fit), 0)


def cross_fitted_embeddings(z: np.ndarray, groups: np.ndarray, rng: np.random.Generator, *, folds: int = 5,
                            components: int = 16, threshold_quantile: float = 0.995) -> EmbeddingSummary:
    """PCA of all of `z` (N, D), calibrated on every image held out by class: the classes
    (`groups` (N,)) are dealt into `folds` folds at random, and each fold's images are scored by a
    PCA fitted without their classes, as a new class taught by a user will be. Every image
    calibrates, so the 99.5th percentile rests on N scores, not on a fifth of them."""
    classes = np.unique(groups)
    if len(classes) < folds or len(z) < 2 * components or len(z) < math.ceil(1.0 / (1.0 - threshold_quantile)):
        raise ValueError(f"{len(z)} embeddings of {len(classes)} classes are too few for {folds} folds and "
                         f"{components} components; pass more training images")
    fold_of_class = dict(zip(rng.permutation(classes).tolist(), np.arange(len(classes)) % folds, strict=True))
    fold = np.array([fold_of_class[c] for c in np.asarray(groups).tolist()])
    dist = np.zeros((len(z), 2))
    for f in range(folds):
        dist[fold == f] = _pca_summary(z[fold != f], components, threshold_quantile).distances(z[fold == f])
    return _calibrated(_pca_summary(z, components, threshold_quantile), dist, threshold_quantile, len(z), len(z))


def _calibrated(stub: EmbeddingSummary, dist: np.ndarray, threshold_quantile: float, n_fit: int,
                n_held: int) -> EmbeddingSummary:
    """`stub`'s PCA with scales and threshold at `threshold_quantile` of held-out distances (M, 2)."""
    mean, basis, resid = stub.mean, stub.basis, stub.residual_variance
    scales = np.maximum(np.quantile(dist, threshold_quantile, axis=0), 1e-12)
    raw = (dist / scales).max(axis=1)
    threshold = max(float(np.quantile(raw, threshold_quantile)), 1e-12)
    qs = {f"p{100 * q:g}": float(np.quantile(raw / threshold, q)) for q in SCORE_QUANTILES}
    return EmbeddingSummary(mean, basis, stub.variances, resid, (float(scales[0]), float(scales[1])),
                            threshold, threshold_quantile, qs, n_fit, n_held)


# -- the domain ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainVerdict:
    """One image: is it out of the training domain, and why (for the answer and the web page)."""

    out_of_domain: bool
    score: float  # embedding score: 1.0 = edge of the training domain (held-out 99.5th percentile)
    reasons: tuple[str, ...]  # for end users, the most telling first; empty when in domain


FAR = "far from the images this model was trained on"
BLANK = "a blank image (one flat colour): there is nothing in it to recognise"
_HIGH = {"mean_intensity": "much brighter than the {t} this model was trained on",
         "contrast": "much more contrast than the {t} this model was trained on",
         "background_fraction": "mostly plain background, unlike the {t} this model was trained on",
         "midtone_fraction": "a photo-like image (many mid-grey tones), unlike the {t} this model was trained on"}
_LOW = {"mean_intensity": "much darker than the {t} this model was trained on",
        "contrast": "much flatter (less contrast) than the {t} this model was trained on",
        "background_fraction": "a busy picture with little plain background, unlike the {t} this model was trained on",
        "midtone_fraction": "mostly pure black and white, unlike the {t} this model was trained on"}


@dataclass(frozen=True, eq=False)
class DomainSummary:
    """What the model was trained on: input format, image statistics, embedding distribution."""

    mode: str  # "L" or "RGB", as the model's preprocessing
    size: int
    trained_on: str  # for messages, e.g. "Omniglot characters"
    image_stats_from: str  # "originals" (uploads as sent) or "model inputs" (colour already gone)
    stats_side: int  # uploads' statistics are taken on small_rgb(img, stats_side), as the training ones
    image_quantiles: dict[str, tuple[float, float, float]]  # stat -> values at STAT_QUANTILES
    image_tolerance: dict[str, float]  # stat -> allowed distance beyond (low, high)
    n_image_stats: int
    embedding: EmbeddingSummary

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def description(self) -> str:
        return f"{'grayscale' if self.mode == 'L' else 'colour'} {self.size}x{self.size} {self.trained_on}"

    def check(self, embeddings: np.ndarray, stats: Sequence[ImageStats] | None = None) -> list[DomainVerdict]:
        """(N, D) embeddings (+ the uploads' ImageStats, if computed) -> one verdict per image."""
        scores = self.embedding.score(np.asarray(embeddings))
        if stats is not None and len(stats) != len(scores):
            raise ValueError(f"{len(stats)} ImageStats for {len(scores)} embeddings; pass one per image or None")
        out = []
        for i, score in enumerate(scores):
            reasons = self.image_reasons(stats[i]) if stats is not None else []
            if score > 1.0:
                reasons.append(FAR)
            out.append(DomainVerdict(bool(reasons), float(score), tuple(reasons)))
        return out

    def image_reasons(self, s: ImageStats) -> list[str]:
        """The statistics of `s` outside the training range (+ tolerance), as user-facing reasons."""
        if "contrast" in self.image_quantiles and s.contrast < BLANK_CONTRAST <= self.image_quantiles["contrast"][0] / 2:
            return [BLANK]
        reasons = []
        for name in (n for n in STAT_NAMES if n in self.image_quantiles):  # in order, whatever the dict's
            (lo, _, hi), v, tol = self.image_quantiles[name], getattr(s, name), self.image_tolerance[name]
            if v > hi + tol or v < lo - tol:
                reasons.append(self._message(name, high=v > hi + tol))
        return reasons

    def _message(self, name: str, *, high: bool) -> str:
        t = self.trained_on
        if name == "colourfulness":
            lo, _, hi = self.image_quantiles[name]
            if high:
                return (f"a colour image sent to a model trained on grayscale {t}" if hi < GRAYSCALE_COLOURFULNESS
                        else f"far more colourful than the {t} this model was trained on")
            return (f"a grayscale image sent to a model trained on colour {t}" if lo >= self.image_tolerance[name]
                    else f"far less colourful than the {t} this model was trained on")
        return (_HIGH if high else _LOW)[name].format(t=t)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "channels": self.channels, "size": self.size, "trained_on": self.trained_on,
                "image_stats_from": self.image_stats_from, "stats_side": self.stats_side,
                "image_quantiles_at": list(STAT_QUANTILES),
                "image_quantiles": {k: list(v) for k, v in self.image_quantiles.items()},
                "image_tolerance": dict(self.image_tolerance), "n_image_stats": self.n_image_stats,
                "embedding": self.embedding.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DomainSummary:
        if not isinstance(d, Mapping):
            raise CheckpointError(f"domain summary must be a dict (DomainSummary.to_dict()); got {type(d).__name__}")
        try:
            s = cls(mode=str(d["mode"]), size=int(d["size"]), trained_on=str(d["trained_on"]),
                    image_stats_from=str(d["image_stats_from"]), stats_side=int(d["stats_side"]),
                    image_quantiles={str(k): _triple(v) for k, v in d["image_quantiles"].items()},
                    image_tolerance={str(k): float(v) for k, v in d["image_tolerance"].items()},
                    n_image_stats=int(d["n_image_stats"]), embedding=EmbeddingSummary.from_dict(d["embedding"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"domain summary is malformed (missing or bad {exc!s}); "
                                  "build it with fewshot.artifacts.domain.summarise_domain(...).to_dict()") from exc
        s.validate(d.get("channels", s.channels))
        return s

    def validate(self, channels: Any = None) -> None:
        if self.mode not in ("L", "RGB") or self.size < 1 or channels not in (None, self.channels):
            raise CheckpointError(f"domain mode {self.mode!r} / channels {channels!r} / size {self.size!r} are "
                                  "inconsistent; want mode 'L' (1 channel) or 'RGB' (3) and size >= 1")
        if not 1 <= self.stats_side <= STATS_MAX_SIDE:
            raise CheckpointError(f"domain stats_side {self.stats_side!r} must be in 1..{STATS_MAX_SIDE}")
        if self.image_stats_from not in STATS_SOURCES:
            raise CheckpointError(f"domain image_stats_from {self.image_stats_from!r} must be one of {STATS_SOURCES}")
        unknown = (set(self.image_quantiles) | set(self.image_tolerance)) - set(STAT_NAMES)
        if unknown or set(self.image_quantiles) != set(self.image_tolerance):
            raise CheckpointError(f"domain image statistics {sorted(unknown) or sorted(self.image_quantiles)} do not "
                                  f"match: each of {list(STAT_NAMES)} needs quantiles and a tolerance")
        for name, (lo, med, hi) in self.image_quantiles.items():
            if not (lo <= med <= hi) or self.image_tolerance[name] < 0:
                raise CheckpointError(f"domain {name}: quantiles {(lo, med, hi)} must ascend and tolerance "
                                      f"{self.image_tolerance[name]!r} be >= 0")


def _triple(v: Any) -> tuple[float, float, float]:
    lo, med, hi = (float(x) for x in v)
    if not all(math.isfinite(x) for x in (lo, med, hi)):
        raise ValueError(f"non-finite quantiles {v!r}")
    return lo, med, hi


def _embed_rows(embedder: Embedder, images_u8: np.ndarray, rows: np.ndarray, batch: int) -> np.ndarray:
    """Embeddings of images_u8[rows], a batch at a time (no copy of the whole selection)."""
    return np.concatenate([embedder.embed(images_u8[rows[i:i + batch]]) for i in range(0, len(rows), batch)])


def summarise_domain(
    embedder: Embedder, images_u8: np.ndarray, stats: Sequence[ImageStats], *, mode: str, size: int,
    rng: np.random.Generator, trained_on: str = "images", image_stats_from: str = "originals",
    held_out: float = 0.2, components: int = 16, threshold_quantile: float = 0.995, batch: int = 512,
    stats_side: int = STATS_SIDE, max_images: int = 20_000, groups: np.ndarray | None = None,
) -> DomainSummary:
    """The domain of training images `images_u8` uint8 (N, C, size, size) under the model's
    preprocessing; `stats` = image_statistics of training images as uploaded (not necessarily the
    same images), taken on small_rgb(img, stats_side). At most `max_images` random images (drawn
    with `rng`) are embedded; a `held_out` share of them calibrates the embedding threshold, or,
    when `groups` (N,) gives each image's class, every image is held out once with its class
    (`cross_fitted_embeddings`, round(1 / held_out) folds)."""
    channels = {"L": 1, "RGB": 3}.get(mode)
    if channels is None or images_u8.dtype != np.uint8 or images_u8.shape[1:] != (channels, size, size):
        raise ValueError(f"images_u8 must be uint8 (N, {channels}, {size}, {size}) for mode {mode!r}; got "
                         f"{images_u8.dtype} {tuple(images_u8.shape)}; pass the training images from the cache")
    if not stats:
        raise ValueError("stats is empty; pass image_statistics(small_rgb(img)) of training uploads, or "
                         "model_image_statistics(images_u8) when the originals are not at hand")
    if groups is not None and (np.shape(groups) != (len(images_u8),) or len(np.unique(groups)) < 2):
        raise ValueError(f"groups must give the class of each of the {len(images_u8)} images, of at least 2 "
                         f"classes; got shape {np.shape(groups)}; pass None to hold out any images")
    order = rng.permutation(len(images_u8))[:max_images]
    z = _embed_rows(embedder, images_u8, order, batch)
    if groups is not None:
        emb = cross_fitted_embeddings(z, np.asarray(groups)[order], rng, folds=max(2, round(1 / held_out)),
                                      components=components, threshold_quantile=threshold_quantile)
    else:
        n_held = int(round(held_out * len(order)))
        emb = summarise_embeddings(z[n_held:], z[:n_held], components=components, threshold_quantile=threshold_quantile)
    values = np.stack([s.as_array() for s in stats])  # (M, n_stats)
    qs = np.quantile(values, STAT_QUANTILES, axis=0)  # (3, n_stats)
    quantiles = {n: (float(qs[0, j]), float(qs[1, j]), float(qs[2, j])) for j, n in enumerate(STAT_NAMES)}
    return DomainSummary(mode=mode, size=size, trained_on=trained_on, image_stats_from=image_stats_from,
                         stats_side=stats_side,
                         image_quantiles=quantiles, image_tolerance=dict(DEFAULT_TOLERANCE),
                         n_image_stats=len(stats), embedding=emb)
