"""Open-set rules on synthetic Gaussian classes whose geometry is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.decision import OpenSetRule, class_spread
from fewshot.errors import ConfigError

D = 16


def gaussian_class(rng: np.random.Generator, centre: float, sigma: float, n: int) -> np.ndarray:
    """(n, D) examples around centre * ones(D), per-dimension std sigma."""
    return centre + sigma * rng.standard_normal((n, D))


def stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the service keeps per class: count (1,), sum of squared norms (1,), prototype (1, D)."""
    return np.array([len(x)]), np.array([(x**2).sum()]), x.mean(0)[None]


def rule_novelty(rule: OpenSetRule, support: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Novelty of `queries` against the single class taught with `support` (Euclidean)."""
    count, sum_sq, mu = stats(support)
    spread = class_spread(count, sum_sq, mu)
    d2 = ((queries - mu) ** 2).sum(-1)
    return rule.novelty(d2, np.full(len(d2), count[0]), np.full(len(d2), spread[0]))


def test_class_spread_is_the_mean_squared_distance_to_the_prototype() -> None:
    rng = np.random.default_rng(0)
    x = gaussian_class(rng, 3.0, 2.0, 7)
    count, sum_sq, mu = stats(x)
    brute = np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))
    assert class_spread(count, sum_sq, mu)[0] == pytest.approx(brute, rel=1e-9)
    one = x[:1]
    assert class_spread(*stats(one))[0] == pytest.approx(0.0, abs=1e-9)  # one example: no spread, never negative
    assert class_spread(np.array([1]), np.array([4.0 - 1e-9]), np.array([[2.0]]))[0] == 0.0
    with pytest.raises(ValueError, match=r"counts must be >= 1; got \[0.0\]"):
        class_spread(np.array([0]), np.array([0.0]), np.zeros((1, D)))


def test_spread_rule_accepts_far_queries_of_a_loose_class_that_a_global_rule_rejects() -> None:
    rng = np.random.default_rng(1)
    tight, loose = gaussian_class(rng, 0.0, 0.2, 20), gaussian_class(rng, 50.0, 3.0, 20)
    fresh_tight, fresh_loose = gaussian_class(rng, 0.0, 0.2, 200), gaussian_class(rng, 50.0, 3.0, 200)
    # a global threshold that keeps the tight class's new examples (d^2 ~ D * 0.04)
    d2_tight = ((fresh_tight - tight.mean(0)) ** 2).sum(-1)
    flat = OpenSetRule("global", "euclidean", threshold=float(np.quantile(d2_tight, 0.99)))
    d2_loose = ((fresh_loose - loose.mean(0)) ** 2).sum(-1)
    assert flat.accepts(flat.novelty(d2_loose, np.full(200, 20), np.zeros(200))).mean() < 0.05

    spread = OpenSetRule("spread", "euclidean", threshold=2.0, prior_spread=1.0, prior_strength=1.0, shot_penalty=1.0)
    assert spread.accepts(rule_novelty(spread, loose, fresh_loose)).mean() > 0.95
    assert spread.accepts(rule_novelty(spread, tight, fresh_tight)).mean() > 0.95
    # ...and still rejects a point that is typical for the loose class but far for the tight one
    off_tight = tight.mean(0) + 3.0 * rng.standard_normal((200, D))
    assert spread.accepts(rule_novelty(spread, tight, off_tight)).mean() < 0.05


@pytest.mark.parametrize(("n", "sigma"), [(2, 0.5), (5, 1.0), (20, 4.0)])
def test_new_examples_of_a_class_have_novelty_near_one(n: int, sigma: float) -> None:
    """With a weak prior and the isotropic penalty (1 + 1/n), a fresh example lies at about the
    expected distance: mean novelty ~ 1 whatever the class's scale and shot count."""
    rng = np.random.default_rng(2)
    rule = OpenSetRule("spread", "euclidean", threshold=1.0, prior_spread=1.0, prior_strength=1e-3, shot_penalty=1.0)
    nov = np.concatenate([rule_novelty(rule, gaussian_class(rng, 0.0, sigma, n), gaussian_class(rng, 0.0, sigma, 20))
                          for _ in range(300)])
    assert 0.85 < nov.mean() < 1.2


def test_a_strong_prior_ranks_like_the_global_rule_and_one_shot_uses_the_prior_alone() -> None:
    rng = np.random.default_rng(3)
    d2, spread = rng.uniform(0, 50, 500), rng.uniform(0.1, 20, 500)
    count = np.full(500, 5)
    strong = OpenSetRule("spread", "euclidean", 1.0, prior_spread=5.0, prior_strength=1e9, shot_penalty=0.4)
    assert np.array_equal(np.argsort(strong.novelty(d2, count, spread)), np.argsort(d2))
    weak = OpenSetRule("spread", "euclidean", 1.0, prior_spread=5.0, prior_strength=0.5, shot_penalty=0.4)
    assert not np.array_equal(np.argsort(weak.novelty(d2, count, spread)), np.argsort(d2))
    # one example: spread is 0 by definition, so the class's scale is the prior's
    ones = np.ones(500)
    assert np.array_equal(np.argsort(weak.novelty(d2, ones, np.zeros(500))), np.argsort(d2))
    # a bigger shot penalty forgives 1-shot classes more than 5-shot ones
    lo, hi = (OpenSetRule("spread", "euclidean", 1.0, prior_spread=5.0, shot_penalty=g) for g in (0.2, 1.0))
    assert (hi.novelty(d2, ones, 0 * d2) / lo.novelty(d2, ones, 0 * d2) <
            hi.novelty(d2, count, spread) / lo.novelty(d2, count, spread)).all()


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_legacy_threshold_as_a_global_rule_makes_the_same_decisions(metric: str) -> None:
    rng = np.random.default_rng(4)
    scores = rng.uniform(0, 20, 1000) if metric == "euclidean" else rng.uniform(-1, 1, 1000)
    t = 7.4 if metric == "euclidean" else 0.3
    rule = OpenSetRule.from_legacy_threshold(metric, t)  # type: ignore[arg-type]
    assert rule.kind == "global"
    got = rule.accepts(rule.novelty(scores, np.full(1000, 5), np.ones(1000)))
    legacy = scores <= t if metric == "euclidean" else scores >= t  # how a legacy threshold was applied
    assert np.array_equal(got, legacy)
    assert got.any() and not got.all()


def test_cosine_novelty_is_higher_for_less_similar_queries() -> None:
    rule = OpenSetRule("spread", "cosine", 0.05, prior_spread=5.0, prior_strength=20.0, shot_penalty=0.4)
    cos = np.array([0.99, 0.9, 0.5, -0.2])
    nov = rule.novelty(cos, np.full(4, 5), np.full(4, 5.0))
    assert (np.diff(nov) > 0).all()
    assert rule.accepts(nov).tolist() == [True, False, False, False]
    assert rule.accepts(nov, threshold=10.0).all()


def test_round_trip_and_refusals() -> None:
    rule = OpenSetRule("spread", "cosine", 0.055, prior_spread=5.2, prior_strength=20.0, shot_penalty=0.35)
    assert OpenSetRule.from_dict(rule.to_dict()) == rule
    assert OpenSetRule.from_dict({"kind": "global", "metric": "euclidean", "threshold": 3}).threshold == 3.0
    bad = [({"kind": "mahalanobis"}, "kind 'mahalanobis' is unknown"),
           ({"metric": "manhattan"}, "metric 'manhattan' is unknown"),
           ({"threshold": float("nan")}, "threshold nan must be a finite number"),
           ({"threshold": True}, "threshold True must be a finite number"),
           ({"prior_spread": 0.0}, "prior_spread 0.0 must be a finite number > 0"),
           ({"prior_strength": -1.0}, "prior_strength -1.0 must be a finite number > 0"),
           ({"shot_penalty": -0.1}, "shot_penalty -0.1 must be a finite number >= 0"),
           ({"shrinkage": 3.0}, r"unknown fields \['shrinkage'\]")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            OpenSetRule.from_dict({**rule.to_dict(), **change})
    with pytest.raises(ConfigError, match=r"lacks \['threshold'\]"):
        OpenSetRule.from_dict({"kind": "global", "metric": "euclidean"})
    with pytest.raises(ConfigError, match="must be a mapping"):
        OpenSetRule.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="counts must be >= 1"):
        rule.novelty(np.array([0.5]), np.array([0]), np.array([0.0]))
