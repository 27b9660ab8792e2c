"""The service's side of the decision rules: numpy in, numpy out, over `fewshot.decision` (the one
implementation that learners, evaluation, calibration and export use too).

* Nearest prototype: `prototype_scores` / `prototype_logits` (squared Euclidean or cosine).
* Probe ("logistic" head): the L2-normalised logistic-regression probe of `fewshot.decision`,
  refitted on a workspace's stored example embeddings.

The matrix products run in torch, whose thread count the service pins (`serve` sets 1): numpy's
OpenBLAS threads contend with ONNX Runtime and request threads on small machines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewshot.decision import Metric, Probe, fit_probe, scores_to_logits
from fewshot.decision import prototype_scores as _scores


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def prototype_scores(q: np.ndarray, protos: np.ndarray, metric: Metric, proto_sq: np.ndarray | None = None) -> np.ndarray:
    """(N, D) queries vs (K, D) prototypes -> (N, K): squared distances or cosine similarities."""
    sq = None if proto_sq is None else _t(proto_sq)
    return _scores(_t(q), _t(protos), metric, sq).numpy()


def prototype_logits(scores: np.ndarray, metric: Metric, cosine_scale: float) -> np.ndarray:
    return scores_to_logits(torch.from_numpy(scores), metric, cosine_scale).numpy()


@dataclass(frozen=True)
class LogisticHead:
    """A fitted probe over a workspace's classes."""

    probe: Probe

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.probe.logits(_t(x)).numpy())


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int) -> LogisticHead:
    """x: (E, D) float32 embeddings, y: (E,) int class indices in [0, n_classes)."""
    return LogisticHead(fit_probe(_t(x), torch.from_numpy(y.astype(np.int64)), n_classes))
