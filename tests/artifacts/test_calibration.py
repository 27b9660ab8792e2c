"""Unknown-rejection calibration (open-set rules; how legacy thresholds read) on open-set episodes
with toy embedders whose geometry we know."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fewshot.artifacts.calibration import (
    Calibration,
    OpenSetScores,
    balanced_threshold,
    calibrate_open_set,
    open_set_episode,
    operating_point,
    sample_open_set,
)
from fewshot.decision import ClassMemory, DecisionRule, ServedDecision, decide
from fewshot.decision.openset import OpenSetRule
from fewshot.errors import ConfigError


class IdentityEmbedder:
    """images (N, 1, 1, D) uint8 -> (N, D) float: lets a test place embeddings exactly."""

    embedding_dim = 4

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        return images_u8.reshape(len(images_u8), -1).astype(np.float32)


def clustered(n_classes: int, n: int, spread: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.integers(30, 220, (n_classes, 4))
    return {f"c{i}": np.clip(centres[i] + rng.integers(-spread, spread + 1, (n, 4)), 0, 255)
            .astype(np.uint8).reshape(n, 1, 1, 4) for i in range(n_classes)}


def test_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="at least n_way \\+ 1 = 6"):
        calibrate_open_set(IdentityEmbedder(), clustered(3, 8, 2), np.random.default_rng(0))
    with pytest.raises(ConfigError, match="too few"):
        calibrate_open_set(IdentityEmbedder(), clustered(8, 3, 2), np.random.default_rng(0))


def test_episode_queries_are_judged_on_the_class_the_served_decision_answers() -> None:
    """Calibration sees what the service sees: the served decision's answer over the support set's
    memory, its score, and that class's count and spread."""
    emb = [IdentityEmbedder().embed(v) for v in clustered(8, 10, spread=20).values()]
    s = open_set_episode(emb, np.random.default_rng(2), n_way=4, n_shot=(1, 5), n_query=3)
    rng = np.random.default_rng(2)  # the same draws, replayed to rebuild the episode
    chosen = rng.choice(len(emb), size=5, replace=False)
    shots = rng.integers(1, 6, size=4)
    support, queries = [], []
    for i, c in enumerate(chosen):
        x = emb[c][rng.permutation(len(emb[c]))]
        k = int(shots[i]) if i < 4 else 0
        support += [x[:k]] if i < 4 else []
        queries.append(x[k:k + 3])
    memory = ClassMemory.of(np.concatenate(support), np.repeat(np.arange(4), shots), 4)
    for metric, got in s.items():
        a = decide(ServedDecision(DecisionRule("prototype", metric)), memory, np.concatenate(queries))
        np.testing.assert_array_equal(got.score, a.score)
        np.testing.assert_array_equal(got.count, np.maximum(memory.counts, 1)[a.label])
        np.testing.assert_array_equal(got.spread, memory.spreads[a.label])
        assert got.correct.tolist() == (a.label == np.repeat(np.arange(5), 3)).tolist()


# -- open-set rules --------------------------------------------------------------------------------
def mixed_spread(n_classes: int, n: int, seed: int) -> dict[str, np.ndarray]:
    """Overlapping Gaussian classes in 8-d, alternately tight (std 2) and loose (std 12)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_classes):
        centre, std = rng.uniform(100, 150, 8), (2.0 if i % 2 else 12.0)
        x = np.round(centre + std * rng.standard_normal((n, 8)))
        out[f"c{i}"] = np.clip(x, 0, 255).astype(np.uint8).reshape(n, 1, 1, 8)
    return out


class IdentityEmbedder8(IdentityEmbedder):
    embedding_dim = 8


@pytest.fixture(scope="module")
def open_set_calibration() -> Calibration:
    return calibrate_open_set(IdentityEmbedder8(), mixed_spread(24, 16, 0), np.random.default_rng(0), n_way=5,
                              n_shot=5, n_query=10, n_episodes=80)


def fresh_scores(seed: int, n_shot: int = 5) -> OpenSetScores:
    emb = [IdentityEmbedder8().embed(v) for v in mixed_spread(24, 16, seed).values()]
    return sample_open_set(emb, np.random.default_rng(seed), n_way=5, n_shot=n_shot, n_query=10,
                           n_episodes=100)["euclidean"]


def test_open_set_rule_separates_unknowns_better_than_a_global_threshold(open_set_calibration: Calibration) -> None:
    cal = open_set_calibration
    rule = cal.rule("euclidean")
    assert rule is not None and rule.kind == "spread"
    flat = OpenSetRule("global", "euclidean", cal.open_set["measured"]["euclidean"]["global"]["threshold"])
    s = fresh_scores(seed=7)  # classes and episodes never seen by the calibration
    mine, theirs = operating_point(rule, s), operating_point(flat, s)
    # class spreads differ 6x by construction: measuring distance in each class's spread must help
    assert mine["auroc"] > theirs["auroc"] + 0.02
    assert mine["true_accept"] > 0.85 and mine["unknown_rejection"] > 0.65
    # on its own episodes, the shot penalty makes 1-shot classes reject unknowns as often as 5-shot ones
    measured = cal.open_set["measured"]["euclidean"]["spread"]
    assert abs(measured["5w1s"]["unknown_rejection"] - measured["5w5s"]["unknown_rejection"]) < 0.03


def test_open_set_calibration_records_its_targets_and_round_trips(open_set_calibration: Calibration) -> None:
    cal = open_set_calibration
    assert set(cal.rules) == {"euclidean", "cosine"}
    assert cal.open_set["target_true_accept"] == 0.95 and cal.open_set["target_rejection"] == 0.8
    measured = cal.open_set["measured"]["euclidean"]["spread"]["5w5s"]
    assert 0.0 < measured["true_accept"] <= 1.0 and 0.0 < measured["unknown_rejection"] <= 1.0
    assert Calibration.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


def test_open_set_calibration_is_deterministic_given_rng() -> None:
    data = mixed_spread(10, 10, 1)
    a, b = (calibrate_open_set(IdentityEmbedder8(), data, np.random.default_rng(3), n_way=3, n_shot=3, n_query=5,
                               n_episodes=20) for _ in range(2))
    assert a == b


def test_open_set_calibration_errors_name_the_value() -> None:
    data = mixed_spread(10, 10, 1)
    with pytest.raises(ConfigError, match="target_rejection 1.2 must be in"):
        calibrate_open_set(IdentityEmbedder8(), data, np.random.default_rng(0), n_way=3, target_rejection=1.2)
    with pytest.raises(ConfigError, match="at least n_way \\+ 1 = 11"):
        calibrate_open_set(IdentityEmbedder8(), data, np.random.default_rng(0), n_way=10)


OLD_MANIFEST_CALIBRATION = {  # as written by bundles before open-set rules (runs/quickstart, 2026-11)
    "n_episodes": 200, "n_query": 5, "n_shot": 5, "n_way": 5, "target_false_accept": 0.05,
    "thresholds": {"cosine": 0.9568591117858887, "euclidean": 7.39666748046875},
    "true_accept": {"cosine": 0.749, "euclidean": 0.7348},
}


def test_old_manifests_read_as_global_rules_with_the_same_decisions() -> None:
    cal = Calibration.from_dict(OLD_MANIFEST_CALIBRATION)
    assert set(cal.rules) == {"euclidean", "cosine"} and not hasattr(cal, "thresholds")
    rng = np.random.default_rng(0)
    for metric, scores in (("euclidean", rng.uniform(0, 15, 500)), ("cosine", rng.uniform(0.9, 1.0, 500))):
        rule = cal.rule(metric)  # type: ignore[arg-type]
        assert rule is not None and rule.kind == "global"
        got = rule.accepts(rule.novelty(scores, np.full(500, 5), np.full(500, 5.0)))
        t = OLD_MANIFEST_CALIBRATION["thresholds"][metric]  # type: ignore[index]
        assert np.array_equal(got, scores <= t if metric == "euclidean" else scores >= t)  # as they were applied
    assert Calibration.from_dict({**OLD_MANIFEST_CALIBRATION, "thresholds": {}}).rule("euclidean") is None


def test_malformed_rules_are_refused(open_set_calibration: Calibration) -> None:
    d = open_set_calibration.to_dict()
    with pytest.raises(ConfigError, match="rule stored under 'euclidean' has metric 'cosine'"):
        Calibration.from_dict({**d, "rules": {"euclidean": d["rules"]["cosine"]}})
    with pytest.raises(ConfigError, match="prior_spread -1.0"):
        Calibration.from_dict({**d, "rules": {"euclidean": {**d["rules"]["euclidean"], "prior_spread": -1.0}}})
    with pytest.raises(ConfigError, match="malformed"):
        Calibration.from_dict({**d, "rules": ["spread"]})


def test_when_both_targets_cannot_be_met_the_taught_classes_come_first() -> None:
    rng = np.random.default_rng(0)
    kept, unknown = rng.normal(0.0, 1.0, 2000), rng.normal(1.0, 1.0, 2000)  # AUROC ~0.76: 95/80 impossible
    t = balanced_threshold(kept, unknown, 0.95, 0.80)
    assert np.mean(kept <= t) >= 0.95 and np.mean(kept < t) < 0.95  # the lowest threshold keeping 95%
    assert 0.05 < np.mean(unknown > t) < 0.5
    easy = rng.normal(4.0, 1.0, 2000)  # separable: both targets met, the margins balanced
    t = balanced_threshold(kept, easy, 0.95, 0.80)
    assert np.mean(kept <= t) > 0.95 and np.mean(easy > t) > 0.80
