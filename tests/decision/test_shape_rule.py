"""The "shape" open-set rule: its threshold follows the number of classes K and the examples n of
the answered class, its cosine is measured from a centre, and every form of the decision agrees."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fewshot.artifacts.calibration import fit_shape_rule, served_episodes
from fewshot.decision import (
    ClassMemory,
    DecisionRule,
    LeaveOneOut,
    OpenSetRule,
    ServedDecision,
    decide,
    fit_memory,
)
from fewshot.errors import ConfigError

COEF = (-0.2, -0.05, 0.15, -0.01)


def shape(centre: np.ndarray | None = None, threshold: float = 1.0, coef: tuple[float, ...] = COEF) -> OpenSetRule:
    return OpenSetRule("shape", "cosine", threshold, coefficients=coef,
                       centre=None if centre is None else tuple(centre.tolist()))


def clusters(rng: np.random.Generator, n_classes: int, per_class: int, dim: int = 12) -> list[np.ndarray]:
    """Gaussian classes around random means, all shifted by one shared offset (like non-negative
    photo features, whose cosines the centre spreads out)."""
    offset = np.full(dim, 4.0)
    return [(offset + rng.standard_normal(dim) * 1.5 + rng.standard_normal((per_class, dim))).astype(np.float32)
            for _ in range(n_classes)]


def test_the_novelty_of_one_query_depends_on_the_number_of_classes_and_examples() -> None:
    """The same query against the same class is judged against t(K, n): adding far-away classes
    (K 2 -> 20) or examples (n 1 -> 5) changes its novelty by exactly the ratio of thresholds."""
    rng = np.random.default_rng(0)
    target = np.ones((1, 6), np.float32)
    q = target + 0.3 * rng.standard_normal((1, 6)).astype(np.float32)
    far = [-10 * np.eye(6, dtype=np.float32)[[i % 6]] * (1 + i) for i in range(19)]
    rule = shape()
    d = ServedDecision(DecisionRule("prototype", "cosine"), rule)

    def novelty(n_examples: int, n_classes: int) -> float:
        x = np.concatenate([np.repeat(target, n_examples, 0), *far[: n_classes - 1]])
        y = np.concatenate([np.zeros(n_examples, np.int64), np.arange(1, n_classes)])
        a = decide(d, ClassMemory.of(x, y, n_classes), q)
        assert a.label[0] == 0 and a.novelty is not None
        return float(a.novelty[0])

    ratio_k = novelty(1, 2) / novelty(1, 20)
    assert ratio_k == pytest.approx(float(rule.shape_threshold(20, np.array([1.0]))[0] /
                                          rule.shape_threshold(2, np.array([1.0]))[0]), rel=1e-6)
    assert ratio_k != pytest.approx(1.0, abs=1e-3)
    ratio_n = novelty(5, 5) / novelty(1, 5)
    assert ratio_n == pytest.approx(float(rule.shape_threshold(5, np.array([1.0]))[0] /
                                          rule.shape_threshold(5, np.array([5.0]))[0]), rel=1e-6)
    assert ratio_n != pytest.approx(1.0, abs=1e-3)


def test_the_centre_moves_the_cosine_and_not_the_answer() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate(clusters(rng, 4, 3))
    y = np.repeat(np.arange(4), 3)
    q = np.concatenate(clusters(rng, 2, 5))
    c = x.mean(0)
    plain = ServedDecision(DecisionRule("prototype", "cosine"), shape(coef=(0, 0, 0, 0)))
    centred = ServedDecision(DecisionRule("prototype", "cosine"), shape(c, coef=(0, 0, 0, 0)))
    memory = ClassMemory.of(x, y, 4)
    a, b = decide(plain, memory, q), decide(centred, memory, q)
    np.testing.assert_array_equal(a.label, b.label)
    mu = memory.means[b.label].astype(np.float64) - c
    qc = q.astype(np.float64) - c
    expect = 1 - (qc * mu).sum(1) / np.linalg.norm(qc, axis=1) / np.linalg.norm(mu, axis=1)
    assert b.novelty is not None and a.novelty is not None
    np.testing.assert_allclose(b.novelty, expect, rtol=1e-4, atol=1e-5)
    assert np.std(b.novelty) > 2 * np.std(a.novelty)  # the shared offset compressed the raw cosines


def test_leave_one_out_with_a_centre_equals_rebuilding_without_the_example() -> None:
    rng = np.random.default_rng(3)
    xs = clusters(rng, 3, 4)
    x, y = np.concatenate(xs), np.repeat(np.arange(3), 4)
    d = ServedDecision(DecisionRule("prototype", "cosine"), shape(x.mean(0) * 0.9))
    loo = decide(d, LeaveOneOut.of(x, y, 3), x)
    assert loo.novelty is not None
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        alone = decide(d, ClassMemory.of(x[keep], y[keep], 3), x[i:i + 1])
        assert loo.label[i] == alone.label[0] and alone.novelty is not None
        assert loo.novelty[i] == pytest.approx(alone.novelty[0], rel=1e-4)


def test_the_fitted_rule_keeps_the_same_share_at_every_shape_and_a_flat_threshold_does_not() -> None:
    """Fitted on 16 synthetic classes, checked on 25 others: the share of correct answers kept stays
    near `keep` from 1 to 10 shots and at 20-way (beyond the fitted ways); the fit's per-shape
    thresholds differ, so a rule that ignored K or n could not keep that share everywhere."""
    rng = np.random.default_rng(5)
    fit_on, check_on = clusters(rng, 16, 30), clusters(rng, 25, 30)
    rule, report = fit_shape_rule(fit_on, np.random.default_rng(0), ways=(2, 5, 10, 15), shots=(1, 3, 10),
                                  n_episodes=30, keep=0.9)
    t = {(c["way"], c["shot"]): c["threshold"] for c in report["cells"]}
    assert t[(5, 1)] > 1.2 * t[(5, 10)]  # fewer examples: a looser threshold
    a0, a1, a2, a3 = rule.coefficients
    assert a2 > 0
    d = ServedDecision(DecisionRule("prototype", "cosine"), rule)
    flat = ServedDecision(DecisionRule("prototype", "cosine"),
                          OpenSetRule("shape", "cosine", 1.0, coefficients=(np.log(t[(5, 3)]), 0, 0, 0),
                                      centre=rule.centre))
    kept, kept_flat = [], []
    for way, shot in ((2, 1), (5, 10), (20, 1), (20, 10)):
        e = served_episodes(d, check_on, np.random.default_rng([way, shot]), n_way=way, n_shot=shot, n_query=10,
                            n_episodes=30)
        f = served_episodes(flat, check_on, np.random.default_rng([way, shot]), n_way=way, n_shot=shot, n_query=10,
                            n_episodes=30)
        kept.append(e.operating_point(1.0)["true_accept"])
        kept_flat.append(f.operating_point(1.0)["true_accept"])
    assert all(0.83 <= k <= 0.97 for k in kept), kept
    assert max(kept_flat) - min(kept_flat) > 2 * (max(kept) - min(kept)), (kept, kept_flat)


def test_a_shape_rule_round_trips_through_json_and_explains_itself() -> None:
    rule = shape(np.arange(4, dtype=np.float32), threshold=1.1)
    back = OpenSetRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert back == rule
    why = rule.explain(20, {1: 3, 5: 2})
    assert why["kind"] == "shape" and why["threshold"] == 1.1 and set(why["by_examples"]) == {"1", "5"}
    assert why["by_examples"]["1"] == pytest.approx(float(rule.shape_threshold(20, np.array([1.0]))[0]) * 1.1)
    assert rule.explain(2)["by_examples"]["1"] != why["by_examples"]["1"]
    assert "20 classes" in why["why"]


@pytest.mark.parametrize("bad,match", [
    ({"coefficients": (1.0, 2.0)}, "4 finite coefficients"),
    ({"coefficients": COEF, "centre": (1.0, float("nan"))}, "finite"),
    ({"coefficients": COEF, "metric": "euclidean", "centre": (1.0,)}, "cosine"),
])
def test_malformed_shape_rules_are_refused(bad: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"kind": "shape", "metric": "cosine", "threshold": 1.0, **bad}
    with pytest.raises(ConfigError, match=match):
        OpenSetRule(**args)  # type: ignore[arg-type]


def test_a_shape_rule_needs_the_number_of_classes() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        shape().novelty(np.array([0.5]), np.array([1.0]), np.array([0.0]))


def test_fitting_needs_enough_classes() -> None:
    with pytest.raises(ConfigError, match="16 held-out classes"):
        fit_shape_rule(clusters(np.random.default_rng(0), 8, 20), np.random.default_rng(0))


def test_probe_head_judges_its_answer_with_the_centred_rule() -> None:
    rng = np.random.default_rng(7)
    x = np.concatenate(clusters(rng, 3, 4))
    y = np.repeat(np.arange(3), 4)
    d = ServedDecision(DecisionRule("probe", "cosine", probe_max_iter=20), shape(x.mean(0)))
    a = decide(d, fit_memory(d, x, y, 3), x)
    assert a.novelty is not None and np.isfinite(a.novelty).all()
