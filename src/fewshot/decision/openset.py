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
* "shape" (the photos bundle's): a threshold that follows the workspace's shape, the number of
  classes K and the judged class's examples n_k, on a cosine measured from a `centre`:

      base    = 1 - cos(q - c, mu_k - c)                   (c: `centre`, e.g. the mean photo embedding)
      t(K, n) = exp(a0 + a1 log K + a2 / n + a3 log K / n) (a: `coefficients`)
      novelty = base / t(K, n_k)                           (threshold 1 = the fitted operating point)

  More classes put an untaught query nearer to one of them, and a prototype of fewer examples lies
  further from its own class's queries; t(K, n) is fitted on held-out classes so that a fixed share
  of correct answers is kept at every shape (`fewshot.artifacts.calibration.fit_shape_rule`), and a
  workspace's rule says which t it uses and why (`OpenSetRule.explain`). Centring removes the
  direction every photo embedding shares (frozen ImageNet features are non-negative), which makes
  cosines spread out ("centring + L2", Wang et al., "SimpleShot", arXiv:1911.04623); the cosine is
  the centred memory's (`ClassMemory.shifted`), so the prototype is the same class mean.
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

RULE_KINDS = ("global", "spread", "shape")
SHAPE_TERMS = ("1", "log K", "1/n", "log K / n")  # the terms of log t(K, n), in `coefficients` order


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

    kind: str  # "global" | "spread" | "shape"
    metric: Metric  # "euclidean" | "cosine"
    threshold: float  # the default operating point, on `novelty`
    prior_spread: float = 1.0  # s0: per-example variance of a typical class (sum over dims), raw space
    prior_strength: float = 20.0  # how many examples the prior is worth
    shot_penalty: float = 1.0  # gamma in 1 + gamma / n_k; 1 = the isotropic model's prototype noise
    coefficients: tuple[float, ...] = ()  # "shape": a0..a3 of log t(K, n) (`SHAPE_TERMS`)
    centre: tuple[float, ...] | None = None  # (D,) subtracted before the cosine ("cosine" only); None: none
    fitted_on: str = ""  # where the rule was fitted (shown with the threshold)

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ConfigError(f"open-set rule kind {self.kind!r} is unknown; use one of {list(RULE_KINDS)}")
        check_metric(self.metric)
        object.__setattr__(self, "coefficients", tuple(float(a) for a in self.coefficients))
        if self.kind == "shape" and (len(self.coefficients) != len(SHAPE_TERMS)
                                     or not all(math.isfinite(a) for a in self.coefficients)):
            raise ConfigError(f"a 'shape' open-set rule needs {len(SHAPE_TERMS)} finite coefficients of log t(K, n) "
                              f"({', '.join(SHAPE_TERMS)}); got {list(self.coefficients)}: fit them with "
                              "fewshot.artifacts.calibration.fit_shape_rule")
        if self.centre is not None:
            centre = tuple(float(v) for v in self.centre)
            if self.metric != "cosine" or not centre or not all(math.isfinite(v) for v in centre):
                raise ConfigError(f"an open-set centre needs the cosine metric and finite values (got metric "
                                  f"{self.metric!r}, {len(centre)} values): a shift changes no Euclidean distance")
            object.__setattr__(self, "centre", centre)
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

    @property
    def centre_array(self) -> np.ndarray | None:
        """(D,) float32 centre, or None."""
        return None if self.centre is None else np.asarray(self.centre, np.float32)

    def shape_threshold(self, n_classes: int, count: np.ndarray) -> np.ndarray:
        """"shape": t(K, n) on the base (1 - centred cosine) for K = `n_classes` and counts n (float64)."""
        if n_classes < 1:
            raise ValueError(f"a 'shape' rule needs the workspace's number of classes (>= 1); got {n_classes}")
        n = np.asarray(count, np.float64)
        if np.any(n < 1):
            raise ValueError(f"class counts must be >= 1; got {n[n < 1][:5].tolist()}")
        a0, a1, a2, a3 = self.coefficients
        log_k = math.log(n_classes)
        return np.exp(a0 + a1 * log_k + (a2 + a3 * log_k) / n)

    def scale(self, count: np.ndarray, spread: np.ndarray, n_classes: int | None = None) -> np.ndarray:
        """Counts n_k and spreads of the judged classes (and, for "shape", the number of classes
        K) -> float64 divisor of the base (1 for "global"); novelty = base / scale. Per class (K,)
        it is what the ONNX form bakes in."""
        n = np.asarray(count, np.float64)
        if self.kind == "global":
            return np.ones(np.broadcast(n, np.asarray(spread)).shape)
        if self.kind == "shape":
            if n_classes is None:
                raise ValueError("a 'shape' rule needs n_classes, the number of classes the workspace answers among")
            return np.broadcast_to(self.shape_threshold(n_classes, n), np.broadcast(n, np.asarray(spread)).shape)
        if np.any(n < 1):
            raise ValueError(f"class counts must be >= 1; got {n[n < 1][:5].tolist()}")
        s = np.maximum(np.asarray(spread, np.float64), 0.0)
        shrunk = (self.prior_strength * self.prior_spread + n * s) / (self.prior_strength + n - 1.0)
        scale = shrunk * (1.0 + self.shot_penalty / n)
        return scale / self.prior_spread if self.metric == "cosine" else scale

    def novelty(self, score: np.ndarray, count: np.ndarray, spread: np.ndarray,
                n_classes: int | None = None) -> np.ndarray:
        """(N,) scores of the judged class (with a `centre`: its centred cosine), (N,) counts n_k and
        (N,) spreads of that class, and the number of classes K ("shape") -> (N,) float64 novelty;
        higher = less like the class."""
        base = self.base(score)
        return base / np.broadcast_to(self.scale(count, spread, n_classes), base.shape)

    def explain(self, n_classes: int, counts: Mapping[int, int] | None = None,
                threshold: float | None = None) -> dict[str, Any]:
        """What a workspace of `n_classes` classes is answered with, and why: the rule, the
        threshold on its novelty, and ("shape") the threshold on 1 - centred cosine for the class
        sizes `counts` (examples per class -> how many classes have that many; default 1..10 examples)."""
        t = self.threshold if threshold is None else threshold
        out: dict[str, Any] = {"kind": self.kind, "metric": self.metric, "threshold": t,
                               "calibrated_threshold": self.threshold, "classes": n_classes,
                               "fitted_on": self.fitted_on}
        if self.kind == "global":
            out["why"] = (f"'unknown' when {'d^2' if self.metric == 'euclidean' else '1 - cos'} to the answered class "
                          f"is above {t:.4g}, whatever the number of classes and examples")
        elif self.kind == "spread":
            out["why"] = (f"'unknown' when the distance to the answered class, in units of that class's own spread "
                          f"(shrunk toward a prior worth {self.prior_strength:g} examples, shot penalty "
                          f"{self.shot_penalty:g}), is above {t:.4g}")
        else:
            sizes = sorted(counts) if counts else list(range(1, 11))
            per = self.shape_threshold(max(n_classes, 1), np.asarray(sizes, np.float64)) * t
            out["by_examples"] = {str(n): round(float(v), 6) for n, v in zip(sizes, per)}
            out["why"] = (f"'unknown' when 1 - cos (from the centre of photos) to the answered class is above t(K, n) x "
                          f"{t:.4g}, where K = {n_classes} classes and n = that class's examples: more classes, or "
                          f"more examples per class, lower t(K, n), fitted so that correct answers are kept at "
                          f"the same rate at every shape ({self.fitted_on or 'held-out classes'})")
        return out

    def accepts(self, novelty: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """(N,) novelty -> (N,) bool: True where the forced-choice answer stands (novelty <= threshold)."""
        t = self.threshold if threshold is None else threshold
        return np.asarray(novelty) <= t

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coefficients"] = list(self.coefficients)
        d["centre"] = None if self.centre is None else list(self.centre)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OpenSetRule:
        if not isinstance(d, Mapping):
            raise ConfigError(f"open-set rule {d!r} must be a mapping; produce it with OpenSetRule.to_dict()")
        fields = set(cls.__dataclass_fields__)
        unknown, missing = set(d) - fields, {"kind", "metric", "threshold"} - set(d)
        if unknown or missing:
            raise ConfigError(f"open-set rule {str(dict(d))[:200]!r} has unknown fields {sorted(unknown)} / lacks "
                              f"{sorted(missing)}; valid fields: {sorted(fields)}")
        args = dict(d)
        for name in ("coefficients", "centre"):
            v = args.get(name)
            if v is not None and not isinstance(v, list | tuple):
                raise ConfigError(f"open-set rule {name} must be a list of numbers; got {type(v).__name__}")
            if v is not None:
                args[name] = tuple(v)
        return cls(**args)

    @classmethod
    def from_legacy_threshold(cls, metric: Metric, threshold: float) -> OpenSetRule:
        """The documented mapping of a legacy raw-score threshold (manifests calibrated before open-set
        rules: accept d^2 <= t, or cos >= t) to a "global" rule with the same decisions."""
        metric = check_metric(metric)
        return cls("global", metric, float(threshold) if metric == "euclidean" else 1.0 - float(threshold))
