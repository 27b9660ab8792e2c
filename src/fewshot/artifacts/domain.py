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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewshot.artifacts.embedders import Embedder
from fewshot.artifacts.embedding_summary import (
    EmbeddingSummary,
    cross_fitted_embeddings,
    min_training_images,
    summarise_embeddings,
)
from fewshot.artifacts.image_stats import (
    STAT_NAMES,
    STATS_MAX_SIDE,
    STATS_SIDE,
    ImageStats,
    image_statistics,
    model_image_statistics,
    small_rgb,
    upload_statistics,
)
from fewshot.errors import CheckpointError

# the image statistics (`image_stats`) and the embedding summary (`embedding_summary`) are parts of
# the domain: their public names are importable from here too
__all__ = [
    "BLANK", "FAR", "STAT_NAMES", "STAT_QUANTILES", "STATS_MAX_SIDE", "STATS_SIDE", "DomainSummary", "DomainVerdict",
    "EmbeddingSummary", "ImageStats", "cross_fitted_embeddings", "image_statistics", "min_training_images",
    "model_image_statistics", "small_rgb", "summarise_domain", "summarise_embeddings", "upload_statistics",
]

STAT_QUANTILES = (0.005, 0.5, 0.995)  # stored per statistic: (low, median, high)
# how far beyond the training range a statistic may go before it is flagged; colourfulness 15 is
# the edge of Hasler & Süsstrunk's "not colourful" band, the others are shares / intensities in [0, 1]
DEFAULT_TOLERANCE = {"colourfulness": 15.0, "midtone_fraction": 0.1, "background_fraction": 0.1,
                     "mean_intensity": 0.1, "contrast": 0.1}
GRAYSCALE_COLOURFULNESS = 5.0  # a training set whose high quantile is below this is grayscale
BLANK_CONTRAST = 0.02  # luma std below ~5 grey levels: one flat colour
STATS_SOURCES = ("originals", "model inputs")


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
