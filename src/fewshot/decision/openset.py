"""Open-set ("unknown") rejection: how unlike its nearest class a query is, and whether to accept it.

A rule maps what the service knows about a query's nearest class to one `novelty` number (higher =
less like the class) and accepts the forced-choice answer when `novelty <= threshold`:

* "global" (the behaviour before rules existed): novelty = d^2 for "euclidean", 1 - cos for
  "cosine"; one threshold for every class.
* "spread": the distance measured in units of the distance a new example of that class is expected
  to have. Under an isotropic model a class's examples scatter around its mean with per-example
  variance s_k (summed over dimensions), so a fresh example lies at E||x - mu_hat_k||^2 =
  s_k (1 + 1/n_k) from a prototype averaged over n_k examples. The rule estimates s_k by shrinking
  the class's own unbiased estimate n_k spread_k / (n_k - 1) toward a prior `prior_spread` worth
  `prior_strength` examples (few shots -> mostly the prior; a class taught with one example uses
  the prior alone), and replaces the 1/n_k by `shot_penalty` / n_k, calibrated so that a query of
  an untaught class is rejected about as often whether its nearest class has 1 or 5 examples:

      s_k~ = (prior_strength * prior_spread + n_k * spread_k) / (prior_strength + n_k - 1)
      novelty = d^2 / (s_k~ (1 + shot_penalty / n_k))                                (euclidean)
      novelty = (1 - cos) * prior_spread / (s_k~ (1 + shot_penalty / n_k))            (cosine)

  (Cosine keeps its own units: a typical class scales 1 - cos by ~1/(1 + shot_penalty / n_k).)
  The shrinkage is the Normal-inverse-chi^2 posterior mean of a variance (Gelman et al., "Bayesian
  Data Analysis", 3rd ed., sec. 3.3); the per-class normalisation is the nearest-class-mean
  "distance to the class, in units of its own scatter" of Mensink et al., "Distance-Based Image
  Classification", TPAMI 2013, reduced to one variance per class.

Inputs per query: `nearest_score` (the metric's score to the nearest prototype: squared distance or
cosine similarity, see `fewshot.decision.rule`), `count` n_k and `spread` (mean squared Euclidean
distance of the class's examples to its prototype in raw embedding space; 0 when n_k == 1) of that
class. The service keeps n_k, mu_k and the sum of squared norms per class; `class_spread` turns
those into spread_k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fewshot.decision.rule import Metric, check_metric
from fewshot.errors import ConfigError

RULE_KINDS = ("global", "spread")


def class_spread(count: np.ndarray, sum_sq: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Per class: (K,) counts n_k, (K,) sums of squared example norms, (K, D) means -> (K,) spread_k =
    mean ||x - mu_k||^2 = sum_sq / n_k - ||mu_k||^2 (float64, clipped at 0 against cancellation)."""
    n = np.asarray(count, np.float64)
    if np.any(n < 1):
        raise ValueError(f"class counts must be >= 1; got {n[n < 1][:5].tolist()}; drop empty classes first")
    mu = np.asarray(prototypes, np.float64)
    return np.maximum(np.asarray(sum_sq, np.float64) / n - (mu * mu).sum(-1), 0.0)


def _finite(name: str, value: Any, *, low: float, strict: bool, hint: str) -> float:
    """`value` as a finite float above `low` (strictly when `strict`), or a ConfigError naming it."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ConfigError(f"open-set rule {name} {value!r} must be a finite number {bound}; {hint}")
    return float(value)


@dataclass(frozen=True)
class OpenSetRule:
    """A novelty score for a query's nearest class and the threshold that accepts it (module doc)."""

    kind: str  # "global" | "spread"
    metric: Metric  # "euclidean" | "cosine"
    threshold: float  # the default operating point, on `novelty`
    prior_spread: float = 1.0  # s0: per-example variance of a typical class (sum over dims), raw space
    prior_strength: float = 20.0  # how many examples the prior is worth
    shot_penalty: float = 1.0  # gamma in 1 + gamma / n_k; 1 = the isotropic model's prototype noise

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ConfigError(f"open-set rule kind {self.kind!r} is unknown; use one of {list(RULE_KINDS)}")
        check_metric(self.metric)
        _finite("threshold", self.threshold, low=-math.inf, strict=True,
                hint="calibrate it with fewshot.artifacts.calibrate_open_set")
        _finite("prior_spread", self.prior_spread, low=0.0, strict=True,
                hint="use the median per-example variance of held-out classes, e.g. 5.0")
        _finite("prior_strength", self.prior_strength, low=0.0, strict=True,
                hint="use the number of examples the prior is worth, e.g. 20")
        _finite("shot_penalty", self.shot_penalty, low=0.0, strict=False, hint="use e.g. 0.4 (0 = ignore counts)")

    def base(self, score: np.ndarray) -> np.ndarray:
        """(N,) scores of the judged class -> (N,) float64 distance-like base: d^2, or 1 - cos."""
        score = np.asarray(score, np.float64)
        return score if self.metric == "euclidean" else 1.0 - score

    def scale(self, count: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """Counts n_k and spreads of the judged classes -> float64 divisor of the base (1 for
        "global"); novelty = base / scale. Per class (K,) it is what the ONNX form bakes in."""
        n = np.asarray(count, np.float64)
        if self.kind == "global":
            return np.ones(np.broadcast(n, np.asarray(spread)).shape)
        if np.any(n < 1):
            raise ValueError(f"class counts must be >= 1; got {n[n < 1][:5].tolist()}")
        s = np.maximum(np.asarray(spread, np.float64), 0.0)
        shrunk = (self.prior_strength * self.prior_spread + n * s) / (self.prior_strength + n - 1.0)
        scale = shrunk * (1.0 + self.shot_penalty / n)
        return scale / self.prior_spread if self.metric == "cosine" else scale

    def novelty(self, score: np.ndarray, count: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """(N,) scores of the judged class, (N,) counts n_k and (N,) spreads of that class -> (N,)
        float64 novelty; higher = less like the class."""
        base = self.base(score)
        return base / np.broadcast_to(self.scale(count, spread), base.shape)

    def accepts(self, novelty: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """(N,) novelty -> (N,) bool: True where the forced-choice answer stands (novelty <= threshold)."""
        t = self.threshold if threshold is None else threshold
        return np.asarray(novelty) <= t

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OpenSetRule:
        if not isinstance(d, Mapping):
            raise ConfigError(f"open-set rule {d!r} must be a mapping; produce it with OpenSetRule.to_dict()")
        fields = set(cls.__dataclass_fields__)
        unknown, missing = set(d) - fields, {"kind", "metric", "threshold"} - set(d)
        if unknown or missing:
            raise ConfigError(f"open-set rule {dict(d)!r} has unknown fields {sorted(unknown)} / lacks "
                              f"{sorted(missing)}; valid fields: {sorted(fields)}")
        return cls(**d)

    @classmethod
    def from_legacy_threshold(cls, metric: Metric, threshold: float) -> OpenSetRule:
        """The documented mapping of a legacy raw-score threshold (manifests calibrated before open-set
        rules: accept d^2 <= t, or cos >= t) to a "global" rule with the same decisions."""
        metric = check_metric(metric)
        return cls("global", metric, float(threshold) if metric == "euclidean" else 1.0 - float(threshold))
