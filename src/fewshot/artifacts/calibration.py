"""Unknown-rejection threshold from held-out open-set episodes.

Each episode draws `n_way` support classes plus one more class that is *left out* of the support
set. Queries of the support classes give "known" scores, queries of the left-out class give
"unknown" scores; the score of a query is its distance (or similarity) to the nearest prototype.
The threshold is the score at which at most `target_false_accept` of the unknown queries would be
accepted. One pass gives thresholds for both metrics (squared Euclidean, cosine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fewshot.artifacts.embedders import Embedder
from fewshot.decision import METRICS, Metric, accepts, nearest, prototype_scores
from fewshot.errors import ConfigError


def nearest_scores(queries: np.ndarray, prototypes: np.ndarray, metric: Metric) -> np.ndarray:
    """(Q, D), (K, D) -> (Q,) score of the nearest prototype: squared distance (lower = closer)
    for "euclidean", cosine similarity (higher = closer) for "cosine" (`fewshot.decision`)."""
    scores = prototype_scores(torch.from_numpy(np.ascontiguousarray(queries, np.float32)),
                              torch.from_numpy(np.ascontiguousarray(prototypes, np.float32)), metric)
    return nearest(scores, metric)[1].numpy()


@dataclass(frozen=True)
class Calibration:
    """Thresholds per metric plus how they were obtained; stored in the bundle manifest."""

    thresholds: dict[str, float]
    target_false_accept: float
    true_accept: dict[str, float]
    n_episodes: int
    n_way: int
    n_shot: int
    n_query: int

    def threshold(self, metric: Metric) -> float | None:
        return self.thresholds.get(metric)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        try:
            return cls(
                thresholds={str(k): float(v) for k, v in d["thresholds"].items()},
                target_false_accept=float(d["target_false_accept"]),
                true_accept={str(k): float(v) for k, v in d.get("true_accept", {}).items()},
                n_episodes=int(d["n_episodes"]), n_way=int(d["n_way"]),
                n_shot=int(d["n_shot"]), n_query=int(d["n_query"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"calibration {dict(d)!r} is malformed ({exc}); produce it with "
                "fewshot.artifacts.calibrate_unknown_threshold(...).to_dict()"
            ) from exc


def _episode_scores(
    emb_by_class: list[np.ndarray], rng: np.random.Generator, n_way: int, n_shot: int, n_query: int
) -> dict[Metric, tuple[np.ndarray, np.ndarray]]:
    """One open-set episode -> per metric (known scores, unknown scores)."""
    chosen = rng.choice(len(emb_by_class), size=n_way + 1, replace=False)
    protos, known_q = [], []
    for c in chosen[:n_way]:
        idx = rng.permutation(len(emb_by_class[c]))
        protos.append(emb_by_class[c][idx[:n_shot]].mean(0))
        known_q.append(emb_by_class[c][idx[n_shot : n_shot + n_query]])
    left_out = emb_by_class[chosen[-1]]
    unknown_q = left_out[rng.permutation(len(left_out))[:n_query]]
    p, k = np.stack(protos), np.concatenate(known_q)
    return {m: (nearest_scores(k, p, m), nearest_scores(unknown_q, p, m)) for m in METRICS}


def _threshold_at(metric: Metric, unknown: np.ndarray, target_false_accept: float) -> float:
    """The tightest score that accepts at most `target_false_accept` of the unknown queries."""
    if metric == "euclidean":  # accept d2 <= t: t at the target quantile of unknown distances
        return float(np.quantile(unknown, target_false_accept, method="lower"))
    return float(np.quantile(unknown, 1.0 - target_false_accept, method="higher"))


def calibrate_unknown_threshold(
    embedder: Embedder, images_by_class: Mapping[str, np.ndarray], rng: np.random.Generator, *,
    n_way: int = 5, n_shot: int = 5, n_query: int = 5, n_episodes: int = 200,
    target_false_accept: float = 0.05,
) -> Calibration:
    """Thresholds at `target_false_accept` on queries whose class was left out of the support set.

    images_by_class: held-out class name -> uint8 (n_i, C, H, W) with n_i >= n_shot + 1.
    """
    if len(images_by_class) < n_way + 1:
        raise ConfigError(
            f"calibration needs at least n_way + 1 = {n_way + 1} held-out classes; got "
            f"{len(images_by_class)}: pass more classes or lower n_way"
        )
    small = {k: len(v) for k, v in images_by_class.items() if len(v) < n_shot + 1}
    if small:
        raise ConfigError(f"calibration classes need >= n_shot + 1 = {n_shot + 1} images; too few: {small}")
    if not 0.0 < target_false_accept < 1.0:
        raise ConfigError(f"target_false_accept {target_false_accept} must be in (0, 1), e.g. 0.05")
    emb = [embedder.embed(images_by_class[k]) for k in sorted(images_by_class)]
    known: dict[Metric, list[np.ndarray]] = {m: [] for m in METRICS}
    unknown: dict[Metric, list[np.ndarray]] = {m: [] for m in METRICS}
    for _ in range(n_episodes):
        for m, (k, u) in _episode_scores(emb, rng, n_way, n_shot, n_query).items():
            known[m].append(k)
            unknown[m].append(u)
    thresholds: dict[str, float] = {m: _threshold_at(m, np.concatenate(unknown[m]), target_false_accept) for m in METRICS}
    true_accept: dict[str, float] = {
        m: float(np.mean(accepts(m, np.concatenate(known[m]), thresholds[m]))) for m in METRICS  # type: ignore[arg-type]
    }
    return Calibration(
        thresholds=thresholds, target_false_accept=target_false_accept, true_accept=true_accept,
        n_episodes=n_episodes, n_way=n_way, n_shot=n_shot, n_query=n_query,
    )
