"""Unknown-rejection calibration from held-out open-set episodes.

Each episode draws `n_way` support classes plus one more class that is *left out* of the support
set. Queries of the support classes are "known", queries of the left-out class "unknown"; each
query is answered by the served decision (`fewshot.decision.decide`, nearest-prototype head, on the
support set's class memory), and judged on the class it is answered with.

* `calibrate_open_set` (what export uses): chooses an `OpenSetRule` per metric (`fewshot.decision`)
  on validation classes against two targets at once: keep `target_true_accept` of the answers that
  forced choice gets right, and reject `target_rejection` of the queries whose class was never
  taught. The default threshold maximises the smaller of the two margins; when both targets
  cannot be met, it keeps `target_true_accept` of the correct answers and rejects what it can
  (`balanced_threshold`).

* `fit_shape_rule` (the photos bundle's): the "shape" rule, whose threshold follows the number of
  classes K and the examples n of the answered class, fitted on episodes of held-out classes at
  many shapes (`SHAPE_WAYS` x `SHAPE_SHOTS`): per shape the threshold that keeps `keep` of the
  correct answers, then log t = a0 + a1 log K + a2 / n + a3 log K / n by least squares, so that
  it reaches shapes the held-out classes cannot (20-way from 16 validation classes).

The legacy raw-score thresholds (one per metric, at a target false-accept rate) are gone: a
calibration stored before open-set rules reads as "global" rules with the same decisions
(`BundleDecision.from_legacy`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fewshot.artifacts.embedders import Embedder
from fewshot.decision import (
    METRICS,
    BundleDecision,
    ClassMemory,
    DecisionRule,
    Metric,
    OpenSetRule,
    ServedDecision,
    decide,
    example_embeddings,
    fit_memory,
)
from fewshot.errors import ConfigError

SHAPE_WAYS = (2, 5, 10, 15)  # fit shapes of the "shape" rule: needs >= max + 1 classes
SHAPE_SHOTS = (1, 2, 5, 10)
SHAPE_KEEP = 0.95  # kept share of correct answers on the fitting classes (held-out photos kept more: BENCHMARKS.md)
PRIOR_STRENGTHS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # examples the prior spread is worth
SHOT_PENALTIES = tuple(round(0.05 * i, 2) for i in range(41))  # gamma in 1 + gamma / n_k: 0 .. 2


@dataclass(frozen=True)
class Calibration:
    """The open-set rules chosen per metric and how they were obtained; stored in the bundle
    manifest, whose `decision` serves the rules (`fewshot.decision.BundleDecision`)."""

    n_episodes: int
    n_way: int
    n_shot: int
    n_query: int
    rules: dict[Metric, OpenSetRule] = field(default_factory=dict)
    open_set: dict[str, Any] = field(default_factory=dict)  # targets, episodes, measured operating points

    def rule(self, metric: Metric) -> OpenSetRule | None:
        """The open-set rule for `metric`; None when the metric was never calibrated."""
        return self.rules.get(metric)

    def to_dict(self) -> dict[str, Any]:
        return {"n_episodes": self.n_episodes, "n_way": self.n_way, "n_shot": self.n_shot, "n_query": self.n_query,
                "rules": {m: r.to_dict() for m, r in self.rules.items()}, "open_set": self.open_set}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """A stored calibration; one written before open-set rules (legacy `thresholds`) reads as
        "global" rules with the same decisions (`BundleDecision.from_legacy`)."""
        try:
            return cls(n_episodes=int(d["n_episodes"]), n_way=int(d["n_way"]), n_shot=int(d["n_shot"]),
                       n_query=int(d["n_query"]), rules=dict(BundleDecision.from_legacy(None, d).open_set),
                       open_set=dict(d.get("open_set", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"calibration {dict(d)!r} is malformed ({exc}); produce it with "
                              "fewshot.artifacts.calibrate_open_set(...).to_dict()") from exc


# -- open-set episodes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenSetScores:
    """Per query of open-set episodes, for one metric: what the service sees about the nearest class."""

    score: np.ndarray  # (N,) score of the nearest prototype
    second: np.ndarray  # (N,) score of the second-nearest prototype (for reference rules only)
    count: np.ndarray  # (N,) n_k of the nearest class
    spread: np.ndarray  # (N,) spread_k of the nearest class
    known: np.ndarray  # (N,) bool: the query's class was taught
    correct: np.ndarray  # (N,) bool: known and forced choice picked its class

    def novelty(self, rule: OpenSetRule) -> np.ndarray:
        return rule.novelty(self.score, self.count, self.spread)

    @classmethod
    def concat(cls, parts: Sequence[OpenSetScores]) -> OpenSetScores:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


def _scores(queries: np.ndarray, labels: np.ndarray, memory: ClassMemory, metric: Metric) -> OpenSetScores:
    """Queries (Q, D) with labels (Q,) (label K = untaught) answered by the served nearest-prototype
    decision over the support set's `memory` (K classes) -> OpenSetScores."""
    a = decide(ServedDecision(DecisionRule("prototype", metric)), memory, queries)
    rows = np.arange(len(queries))
    runner_up = np.argsort(-a.preference, axis=1, kind="stable")[:, 1] if memory.n_classes > 1 else None
    second = np.full(len(queries), np.nan) if runner_up is None else a.scores[rows, runner_up].astype(np.float64)
    count, spread = memory.judged(a.label)
    known = labels < memory.n_classes
    return OpenSetScores(a.score.astype(np.float64), second, count, spread, known, known & (a.label == labels))


def open_set_episode(emb_by_class: Sequence[np.ndarray], rng: np.random.Generator, *, n_way: int,
                     n_shot: int | tuple[int, int], n_query: int,
                     examples_by_class: Sequence[np.ndarray] | None = None) -> dict[Metric, OpenSetScores]:
    """One episode: `n_way` taught classes with `n_shot` examples each (a (low, high) pair draws each
    class's count uniformly from low..high) and `n_query` queries each, plus `n_query` queries of
    one untaught class -> per metric OpenSetScores. emb_by_class: [(n_i, D)] embeddings;
    examples_by_class: the same images' embeddings as taught examples (through the decision's
    example views, `fewshot.decision.views`; None: the same as emb_by_class)."""
    taught = emb_by_class if examples_by_class is None else examples_by_class
    lo, hi = (n_shot, n_shot) if isinstance(n_shot, int) else n_shot
    chosen = rng.choice(len(emb_by_class), size=n_way + 1, replace=False)
    shots = rng.integers(lo, hi + 1, size=n_way)
    support, queries = [], []
    for i, c in enumerate(chosen):
        order = rng.permutation(len(emb_by_class[c]))
        k = int(shots[i]) if i < n_way else 0
        support += [taught[c][order[:k]]] if i < n_way else []
        queries.append(emb_by_class[c][order[k : k + n_query]])
    labels = np.concatenate([np.full(len(q), i) for i, q in enumerate(queries)])
    q = np.ascontiguousarray(np.concatenate(queries), np.float32)
    memory = ClassMemory.of(np.concatenate(support), np.repeat(np.arange(n_way), [len(s) for s in support]), n_way)
    return {m: _scores(q, labels, memory, m) for m in METRICS}


def sample_open_set(emb_by_class: Sequence[np.ndarray], rng: np.random.Generator, *, n_way: int,
                    n_shot: int | tuple[int, int], n_query: int, n_episodes: int,
                    examples_by_class: Sequence[np.ndarray] | None = None) -> dict[Metric, OpenSetScores]:
    """`n_episodes` open-set episodes (see `open_set_episode`), concatenated per metric."""
    eps = [open_set_episode(emb_by_class, rng, n_way=n_way, n_shot=n_shot, n_query=n_query,
                            examples_by_class=examples_by_class) for _ in range(n_episodes)]
    return {m: OpenSetScores.concat([e[m] for e in eps]) for m in METRICS}


# -- trade-off between kept correct answers and rejected unknowns --------------------------------
def trade_off(kept: np.ndarray, unknown: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Novelty of correct known queries (A,) and of unknown queries (B,) -> every distinct threshold
    (T,) with the fraction of correct answers kept (novelty <= t) and of unknowns rejected (> t)."""
    if len(kept) == 0 or len(unknown) == 0:
        raise ValueError(f"need correct known and unknown queries; got {len(kept)} and {len(unknown)}")
    k, u = np.sort(kept), np.sort(unknown)
    t = np.unique(np.concatenate([k, u]))
    return t, np.searchsorted(k, t, "right") / len(k), 1.0 - np.searchsorted(u, t, "right") / len(u)


def auroc(kept: np.ndarray, unknown: np.ndarray) -> float:
    """P(an unknown query's novelty > a correct known query's), ties counting one half."""
    u = np.sort(unknown)
    below, above = np.searchsorted(u, kept, "left"), np.searchsorted(u, kept, "right")
    return float(np.mean((len(u) - above) + 0.5 * (above - below)) / len(u))


def balanced_threshold(kept: np.ndarray, unknown: np.ndarray, target_true_accept: float,
                       target_rejection: float) -> float:
    """The threshold maximising min(kept - target_true_accept, rejected - target_rejection), the
    middle of the best plateau, when both targets can be met. When they cannot (an embedding that
    separates unknowns poorly, such as frozen ImageNet features on small photos), the classes users
    taught come first: the lowest threshold that keeps `target_true_accept` of the correct answers,
    rejecting as many unknowns as that allows."""
    t, ta, rej = trade_off(kept, unknown)
    margin = np.minimum(ta - target_true_accept, rej - target_rejection)
    if margin.max() < 0:
        return float(t[np.flatnonzero(ta >= target_true_accept)[0]])
    best = np.flatnonzero(margin == margin.max())
    return float(t[best[len(best) // 2]])


def operating_point(rule: OpenSetRule, s: OpenSetScores, threshold: float | None = None) -> dict[str, float]:
    """Fraction of correct answers kept and of unknown queries rejected at the rule's threshold, the
    AUROC, and forced-choice accuracy on known queries."""
    nov = s.novelty(rule)
    keep = rule.accepts(nov, threshold)
    return {"true_accept": float(keep[s.correct].mean()), "unknown_rejection": float(1.0 - keep[~s.known].mean()),
            "auroc": auroc(nov[s.correct], nov[~s.known]), "accuracy": float(s.correct[s.known].mean())}


def at_threshold(rule: OpenSetRule, s: OpenSetScores, target_true_accept: float,
                 target_rejection: float) -> OpenSetRule:
    """`rule` with its balanced threshold on `s`."""
    nov = s.novelty(rule)
    return replace(rule, threshold=balanced_threshold(nov[s.correct], nov[~s.known], target_true_accept, target_rejection))


# -- choosing a rule ------------------------------------------------------------------------------
def prior_spread(emb_by_class: Sequence[np.ndarray]) -> float:
    """Median over classes of the unbiased per-example variance n / (n - 1) * mean ||x - mean||^2."""
    v = [len(e) / (len(e) - 1) * ((e - e.mean(0)) ** 2).sum(-1).mean() for e in emb_by_class if len(e) > 1]
    if not v:
        raise ConfigError("the prior spread needs classes with >= 2 images; pass more images per class")
    return float(np.median(np.asarray(v, np.float64)))


def fit_spread_rule(by_shot: Mapping[int, OpenSetScores], metric: Metric, n_shot: int, spread0: float, *,
                    target_true_accept: float, target_rejection: float,
                    prior_strengths: Sequence[float] = PRIOR_STRENGTHS,
                    shot_penalties: Sequence[float] = SHOT_PENALTIES) -> OpenSetRule:
    """The "spread" rule on validation episodes: `prior_strength` maximises AUROC on `n_shot`-shot
    episodes (largest on ties); `shot_penalty` makes 1-shot episodes reject unknowns as often as
    `n_shot`-shot ones at the same threshold (smallest on ties; 1 when `n_shot` is 1); the threshold
    is balanced on `n_shot`-shot episodes."""
    main = by_shot[n_shot]
    base = OpenSetRule("spread", metric, 0.0, prior_spread=spread0)

    def auc(lam: float) -> float:
        nov = main.novelty(replace(base, prior_strength=lam))
        return auroc(nov[main.correct], nov[~main.known])

    lam = max(sorted(prior_strengths, reverse=True), key=auc) if n_shot > 1 else base.prior_strength
    base = replace(base, prior_strength=float(lam))

    if n_shot == 1 or 1 not in by_shot:  # the penalty is not identifiable: keep the isotropic model's 1
        return at_threshold(base, main, target_true_accept, target_rejection)

    def fitted(gamma: float) -> tuple[float, OpenSetRule]:
        rule = at_threshold(replace(base, shot_penalty=float(gamma)), main, target_true_accept, target_rejection)
        gap = operating_point(rule, by_shot[1])["unknown_rejection"] - operating_point(rule, main)["unknown_rejection"]
        return abs(gap), rule

    return min((fitted(g) for g in sorted(shot_penalties)), key=lambda x: x[0])[1]


def fit_open_set_rules(emb_by_class: Sequence[np.ndarray], rng: np.random.Generator, *, n_way: int, n_shot: int,
                       n_query: int, n_episodes: int, target_true_accept: float = 0.95,
                       target_rejection: float = 0.80, prior_strengths: Sequence[float] = PRIOR_STRENGTHS,
                       examples_by_class: Sequence[np.ndarray] | None = None,
                       ) -> tuple[dict[Metric, OpenSetRule], dict[str, Any], dict[Metric, OpenSetScores]]:
    """Per metric the "spread" rule chosen on `n_episodes` episodes of `n_way`-way `n_shot`-shot
    (and 1-shot, for the shot penalty) -> (rules, report of the targets and the measured operating
    points of the rule and of a "global" rule balanced the same way, the `n_shot` episodes).
    `examples_by_class`: the images as taught examples (`open_set_episode`); the prior spread is
    theirs, as a class's spread in the service is that of its stored examples."""
    shots = sorted({1, n_shot})
    by_shot = {k: sample_open_set(emb_by_class, rng, n_way=n_way, n_shot=k, n_query=n_query, n_episodes=n_episodes,
                                  examples_by_class=examples_by_class)
               for k in shots}
    spread0 = prior_spread(emb_by_class if examples_by_class is None else examples_by_class)
    rules: dict[Metric, OpenSetRule] = {}
    measured: dict[str, Any] = {}
    for m in METRICS:
        one = {k: s[m] for k, s in by_shot.items()}
        rules[m] = fit_spread_rule(one, m, n_shot, spread0, target_true_accept=target_true_accept,
                                   target_rejection=target_rejection, prior_strengths=prior_strengths)
        flat = at_threshold(OpenSetRule("global", m, 0.0), one[n_shot], target_true_accept, target_rejection)
        measured[m] = {r.kind: {"threshold": r.threshold, **{f"{n_way}w{k}s": operating_point(r, s) for k, s in one.items()}}
                       for r in (rules[m], flat)}
    report = {"target_true_accept": target_true_accept, "target_rejection": target_rejection, "n_way": n_way,
              "shots": shots, "n_query": n_query, "n_episodes": n_episodes, "prior_spread": spread0,
              "measured": measured}
    return rules, report, {m: by_shot[n_shot][m] for m in METRICS}


def _check_classes(images_by_class: Mapping[str, np.ndarray], n_way: int, n_shot: int) -> None:
    if len(images_by_class) < n_way + 1:
        raise ConfigError(
            f"calibration needs at least n_way + 1 = {n_way + 1} held-out classes; got "
            f"{len(images_by_class)}: pass more classes or lower n_way"
        )
    small = {k: len(v) for k, v in images_by_class.items() if len(v) < n_shot + 1}
    if small:
        raise ConfigError(f"calibration classes need >= n_shot + 1 = {n_shot + 1} images; too few: {small}")


def _check_rate(name: str, value: float, example: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{name} {value} must be in (0, 1), e.g. {example}")


def calibrate_open_set(
    embedder: Embedder, images_by_class: Mapping[str, np.ndarray], rng: np.random.Generator, *,
    n_way: int = 5, n_shot: int = 5, n_query: int = 15, n_episodes: int = 200,
    target_true_accept: float = 0.95, target_rejection: float = 0.80, views: tuple[str, int] = ("none", 0),
) -> Calibration:
    """Open-set rules per metric (see module doc).

    images_by_class: held-out (validation) class name -> uint8 (n_i, C, H, W) with n_i >= n_shot + 1.
    views: the decision's example views and shift (`DecisionRule.views`, `view_shift`): taught
    examples are embedded through them, queries as they are, as the service does.
    """
    _check_classes(images_by_class, n_way, n_shot)
    for name, value, example in (("target_true_accept", target_true_accept, 0.95),
                                 ("target_rejection", target_rejection, 0.8)):
        _check_rate(name, value, example)
    emb = [embedder.embed(images_by_class[k]) for k in sorted(images_by_class)]
    examples = None if views[0] == "none" else [example_embeddings(embedder.embed, images_by_class[k], *views)
                                                for k in sorted(images_by_class)]
    rules, report, _ = fit_open_set_rules(emb, rng, n_way=n_way, n_shot=n_shot, n_query=n_query,
                                          n_episodes=n_episodes, target_true_accept=target_true_accept,
                                          target_rejection=target_rejection, examples_by_class=examples)
    report["views"] = {"views": views[0], "shift": views[1]}
    return Calibration(n_episodes=n_episodes, n_way=n_way, n_shot=n_shot, n_query=n_query, rules=dict(rules),
                       open_set=report)


# -- the "shape" rule: a threshold that follows the number of classes and examples ---------------
@dataclass(frozen=True)
class OpenSetEpisodes:
    """Queries of open-set episodes answered by one served decision: novelty (N,) (nan without an
    open-set rule), known (N,) (the query's class was taught), correct (N,) (known and answered right),
    and per query the second-best score (N,) of the head (for reference rules)."""

    novelty: np.ndarray
    known: np.ndarray
    correct: np.ndarray
    second: np.ndarray

    def operating_point(self, threshold: float) -> dict[str, float]:
        keep = self.novelty <= threshold
        return {"true_accept": float(keep[self.correct].mean()), "unknown_rejection": float(1 - keep[~self.known].mean()),
                "accuracy": float(self.correct[self.known].mean())}


def served_episodes(decision: ServedDecision, emb_by_class: Sequence[np.ndarray], rng: np.random.Generator, *,
                    n_way: int, n_shot: int, n_query: int, n_episodes: int,
                    untaught: Sequence[np.ndarray] | None = None) -> OpenSetEpisodes:
    """`n_episodes` episodes: `n_way` classes of `emb_by_class` [(n_i, D)] taught with `n_shot`
    examples, `n_query` queries of each, and `n_query` queries of one untaught class (another class
    of `emb_by_class`, or one of `untaught` when given), answered by `decide(decision, ...)`."""
    pool = untaught if untaught is not None else emb_by_class
    need = n_way + (1 if untaught is None else 0)
    if len(emb_by_class) < need or not pool:
        raise ConfigError(f"{n_way}-way open-set episodes need {need} classes (+ an untaught pool); got "
                          f"{len(emb_by_class)}")
    parts = []
    for _ in range(n_episodes):
        chosen = rng.choice(len(emb_by_class), size=need, replace=False)
        xs = [emb_by_class[c][rng.permutation(len(emb_by_class[c]))] for c in chosen[:n_way]]
        other = pool[int(chosen[n_way]) if untaught is None else int(rng.integers(len(pool)))]
        support = np.concatenate([x[:n_shot] for x in xs])
        queries = [x[n_shot:n_shot + n_query] for x in xs] + [other[rng.permutation(len(other))[:n_query]]]
        labels = np.concatenate([np.full(len(q), i) for i, q in enumerate(queries)])
        q = np.ascontiguousarray(np.concatenate(queries), np.float32)
        a = decide(decision, fit_memory(decision, support, np.repeat(np.arange(n_way), n_shot), n_way), q)
        second = (np.sort(a.preference, 1)[:, -2] if n_way > 1 else np.full(len(q), np.nan))
        nov = np.full(len(q), np.nan) if a.novelty is None else a.novelty
        known = labels < n_way
        parts.append((nov, known, known & (a.label == labels), second))
    return OpenSetEpisodes(*(np.concatenate([p[i] for p in parts]) for i in range(4)))


def shape_terms(n_classes: np.ndarray, count: np.ndarray) -> np.ndarray:
    """(M,) K and (M,) n -> (M, 4) the terms of log t(K, n) (`fewshot.decision.openset.SHAPE_TERMS`)."""
    log_k, inv_n = np.log(np.asarray(n_classes, np.float64)), 1.0 / np.asarray(count, np.float64)
    return np.stack([np.ones_like(log_k), log_k, inv_n, log_k * inv_n], 1)


def fit_shape_rule(emb_by_class: Sequence[np.ndarray], rng: np.random.Generator, *,
                   centre: np.ndarray | None = None, ways: Sequence[int] = SHAPE_WAYS,
                   shots: Sequence[int] = SHAPE_SHOTS, n_query: int = 15, n_episodes: int = 60,
                   keep: float = SHAPE_KEEP, fitted_on: str = "") -> tuple[OpenSetRule, dict[str, Any]]:
    """The cosine "shape" rule on held-out classes `emb_by_class` [(n_i, D)] (module doc) -> (rule,
    report with the threshold and the kept / rejected shares of every fitted shape).

    centre: (D,) the cosine's origin; None: the mean of every embedding given (centring the photos).
    """
    _check_rate("keep", keep, SHAPE_KEEP)
    if len(emb_by_class) < max(ways) + 1:
        raise ConfigError(f"the shape rule's {max(ways)}-way episodes need {max(ways) + 1} held-out classes; got "
                          f"{len(emb_by_class)}: pass more classes or lower `ways`")
    small = {i: len(e) for i, e in enumerate(emb_by_class) if len(e) < max(shots) + 1}
    if small:
        raise ConfigError(f"the shape rule's {max(shots)}-shot episodes need >= {max(shots) + 1} embeddings per class; "
                          f"too few (class index: count): {small}")
    c = np.concatenate(emb_by_class).mean(0) if centre is None else np.asarray(centre, np.float64)
    plain = OpenSetRule("shape", "cosine", 1.0, coefficients=(0.0, 0.0, 0.0, 0.0), centre=tuple(c.tolist()))
    decision = ServedDecision(DecisionRule("prototype", "cosine"), plain)  # novelty = 1 - centred cosine
    cells = []
    for k in ways:
        for n in shots:
            e = served_episodes(decision, emb_by_class, rng, n_way=k, n_shot=n, n_query=n_query, n_episodes=n_episodes)
            t = float(np.quantile(e.novelty[e.correct], keep))
            cells.append({"way": k, "shot": n, "threshold": t, **e.operating_point(t)})
    terms = shape_terms(np.asarray([r["way"] for r in cells]), np.asarray([r["shot"] for r in cells]))
    coef, *_ = np.linalg.lstsq(terms, np.log([r["threshold"] for r in cells]), rcond=None)
    rule = replace(plain, coefficients=tuple(float(a) for a in coef), fitted_on=fitted_on)
    for r, fit in zip(cells, np.exp(terms @ coef)):
        r["fitted_threshold"] = float(fit)
    return rule, {"keep": keep, "ways": list(ways), "shots": list(shots), "n_query": n_query,
                  "n_episodes": n_episodes, "coefficients": list(rule.coefficients), "cells": cells}
