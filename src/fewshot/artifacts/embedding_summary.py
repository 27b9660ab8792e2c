"""In-domain embeddings as a PCA with a calibrated threshold: the embedding half of a bundle's
training domain (`fewshot.artifacts.domain`). Stored in the manifest as base64 arrays."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewshot.errors import CheckpointError

METHOD = "pca-max-v1"
SCORE_QUANTILES = (0.5, 0.9, 0.99, 0.995, 0.999)


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
        return np.asarray((self.distances(z) / np.asarray(self.scales)).max(axis=1), np.float64)

    def score(self, z: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) float64; 1.0 is the calibrated edge of the training domain."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (N, {self.dim}); got {tuple(z.shape)}; embed with the bundle's model")
        return np.asarray(self.raw_score(z) / self.threshold, np.float64)

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
