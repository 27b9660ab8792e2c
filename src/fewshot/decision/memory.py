"""The class memory a served decision works on: what is kept per class, and nothing else.

Per class k of K: the sum of its example embeddings (D,), the sum of their squared norms, the
count n_k and (for a probe head) the probe fitted on the examples. From these:

    prototype  mu_k = sum_k / n_k                 (float64, served as float32)
    spread_k   = sum_sq_k / n_k - ||mu_k||^2      (mean squared distance to mu_k, clipped at 0)

The service keeps this memory per workspace and updates one class's row when images are added;
calibration, export's measurement, distillation teachers and the insight panel build it from
support sets (`ClassMemory.of`). `LeaveOneOut` is the memory each stored example sees when it is
held out of its own class, in closed form (the insight panel's exact leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fewshot.decision.rule import Metric, Probe, prototype_scores


@dataclass(frozen=True)
class ClassMemory:
    """sums (K, D) float64, sq_sums (K,) float64, counts (K,) int64; `probe` fitted on the examples
    when the decision's head is a probe (None otherwise, or with fewer than 2 classes)."""

    sums: np.ndarray
    sq_sums: np.ndarray
    counts: np.ndarray
    probe: Probe | None = None
    means: np.ndarray = field(init=False, repr=False)  # (K, D) float32 prototypes, as served
    sq_norms: np.ndarray = field(init=False, repr=False)  # (K,) float32 ||mu_k||^2
    spreads: np.ndarray = field(init=False, repr=False)  # (K,) float64

    def __post_init__(self) -> None:
        k = len(self.counts)
        if self.sums.ndim != 2 or self.sums.shape[0] != k or self.sq_sums.shape != (k,):
            raise ValueError(f"class memory needs sums (K, D), sq_sums (K,) and counts (K,); got "
                             f"{self.sums.shape}, {self.sq_sums.shape}, {self.counts.shape}")
        n = np.maximum(self.counts, 1)
        means64 = self.sums / n[:, None]
        spreads = np.maximum(self.sq_sums / n - (means64 * means64).sum(1), 0.0)
        means = means64.astype(np.float32)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "sq_norms", (means * means).sum(1))
        object.__setattr__(self, "spreads", spreads)

    @property
    def n_classes(self) -> int:
        return len(self.counts)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, n_classes: int, probe: Probe | None = None) -> ClassMemory:
        """Embeddings x (N, D) with class indices y (N,) in 0..n_classes-1 -> their memory."""
        x64 = torch.from_numpy(np.ascontiguousarray(x, np.float64))
        yt = torch.from_numpy(np.asarray(y, np.int64))
        sums = torch.zeros(n_classes, x64.shape[1], dtype=torch.float64).index_add_(0, yt, x64)
        sq = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, yt, (x64 * x64).sum(1))
        counts = np.bincount(np.asarray(y, np.int64), minlength=n_classes).astype(np.int64)
        return cls(sums.numpy(), sq.numpy(), counts, probe)

    @classmethod
    def empty(cls, dim: int) -> ClassMemory:
        return cls(np.zeros((0, dim)), np.zeros(0), np.zeros(0, np.int64))

    def shifted(self, centre: np.ndarray) -> ClassMemory:
        """The memory of the same examples moved by -centre (D,): sums - n_k c, sq_sums - 2 sums . c +
        n_k ||c||^2 (same counts and spreads; no probe). Its cosines are measured from `centre`."""
        c = np.asarray(centre, np.float64)
        n = self.counts.astype(np.float64)
        return ClassMemory(self.sums - n[:, None] * c, self.sq_sums - 2.0 * (self.sums @ c) + n * float(c @ c),
                           self.counts)

    def scores(self, q: np.ndarray, metric: Metric) -> np.ndarray:
        """Queries (N, D) -> (N, K) float32: squared distances or cosine similarities to the prototypes."""
        return prototype_scores(np.asarray(q, np.float32), self.means, metric, self.sq_norms)

    def judged(self, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) class indices -> (counts (N,) float64 >= 1, spreads (N,) float64) of those classes,
        as the queries see them."""
        return np.maximum(self.counts, 1)[label].astype(np.float64), self.spreads[label]


@dataclass(frozen=True)
class LeaveOneOut:
    """The memory of examples x (N, D) with classes y (N,), as each example sees it when it is
    removed from its own class; its queries are those examples, in order. Removing x_i from class c
    (n_c examples, mean mu_c) moves only that mean, to mu_c' = (n_c mu_c - x_i) / (n_c - 1):

        ||x_i - mu_c'||^2 = (n_c / (n_c - 1))^2 ||x_i - mu_c||^2
        x_i . mu_c'        = (n_c x_i . mu_c - ||x_i||^2) / (n_c - 1)
        ||mu_c'||^2        = (n_c^2 ||mu_c||^2 - 2 n_c x_i . mu_c + ||x_i||^2) / (n_c - 1)^2

    so one (N, K) score matrix plus O(N D) corrections gives every held-out answer. An example of
    a one-example class is not held out (`held` False): its class keeps it."""

    memory: ClassMemory
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, n_classes: int) -> LeaveOneOut:
        return cls(ClassMemory.of(x, y, n_classes), np.asarray(x, np.float32), np.asarray(y, np.int64))

    def shifted(self, centre: np.ndarray) -> LeaveOneOut:
        """The same leave-one-out memory with every example moved by -centre (D,)."""
        c = np.asarray(centre, np.float32)
        return LeaveOneOut(self.memory.shifted(c), self.x - c, self.y)

    @property
    def probe(self) -> Probe | None:
        return None  # the probe has no closed form: it is measured by k-fold cross-validation

    @property
    def n_classes(self) -> int:
        return self.memory.n_classes

    @property
    def held(self) -> np.ndarray:
        """(N,) bool: the example's class has >= 2 examples, so it can be held out."""
        return np.asarray(self.memory.counts[self.y] >= 2, bool)

    def _own(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per example, float64: n_c (2 where not held), ||x_i||^2, x_i . mu_c, ||mu_c'||^2."""
        mu = self.memory.sums / np.maximum(self.memory.counts, 1)[:, None]
        x64 = self.x.astype(np.float64)
        m = np.where(self.held, self.memory.counts[self.y], 2).astype(np.float64)
        xsq = (x64 * x64).sum(1)
        dot = (x64 * mu[self.y]).sum(1)
        mu_sq = np.maximum((m * m * (mu[self.y] * mu[self.y]).sum(1) - 2 * m * dot + xsq) / (m - 1) ** 2, 0.0)
        return m, xsq, dot, mu_sq

    def scores(self, q: np.ndarray, metric: Metric) -> np.ndarray:
        """(N, K) float64 scores of the examples (`q` must be `x`), own class held out."""
        if q.shape != self.x.shape:
            raise ValueError(f"leave-one-out queries are the memory's own {self.x.shape} examples; got {q.shape}")
        scores = self.memory.scores(self.x, metric).astype(np.float64)  # other classes' columns are already held out
        m, xsq, dot, mu_sq = self._own()
        rows = np.arange(len(self.y))
        if metric == "euclidean":
            own = scores[rows, self.y] * (m / (m - 1)) ** 2
        else:  # torch's normalize divides by max(norm, 1e-12)
            own = ((m * dot - xsq) / (m - 1)) / (np.maximum(np.sqrt(xsq), 1e-12) * np.maximum(np.sqrt(mu_sq), 1e-12))
        held = self.held
        scores[rows[held], self.y[held]] = own[held]
        return scores

    def judged(self, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts and spreads of the classes `label` (N,) as each example sees them (its own class
        without it)."""
        count, spread = self.memory.judged(label)
        m, xsq, _, mu_sq = self._own()
        spread_loo = np.maximum((self.memory.sq_sums[self.y] - xsq) / (m - 1) - mu_sq, 0.0)
        mine = label == self.y
        return np.where(mine, m - 1, count), np.where(mine, spread_loo, spread)
