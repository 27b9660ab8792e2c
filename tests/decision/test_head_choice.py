"""Choosing a workspace's head by held-out answers on its own examples (`choose_head`)."""

from __future__ import annotations

import numpy as np
import pytest

from fewshot.decision import DecisionRule, OpenSetRule, ServedDecision
from fewshot.decision.heldout import choose_head
from fewshot.errors import ConfigError


def tilted(seed: int, n: int = 20, spread: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes 1 apart along axis 0, with large shared noise along (1, 1): nearest prototypes
    confuse them (the noise moves examples towards the other mean), a linear probe finds the
    direction across the noise and separates them."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n)
    means = np.array([[0.5, 0, 1, 0], [-0.5, 0, 1, 0]], np.float32)
    x = means[y] + np.outer(rng.standard_normal(len(y)) * spread, [1, 1, 0, 0]) / np.sqrt(2)
    return (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), y


def clusters(seed: int, per_class: int = 10, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), per_class)
    return (3 * np.eye(k, 4)[y] + rng.standard_normal((len(y), 4))).astype(np.float32), y


def heads(metric: str = "euclidean", open_set: OpenSetRule | None = None) -> list[ServedDecision]:
    return [ServedDecision(DecisionRule(h, metric), open_set) for h in ("prototype", "probe")]  # type: ignore[arg-type]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_the_probe_is_chosen_where_it_answers_more_held_out_examples_right(metric: str) -> None:
    x, y = tilted(0)
    choice = choose_head(heads(metric), x, y, 2)
    proto, probe = choice.scores
    assert (proto.head, probe.head) == ("prototype", "probe") and proto.evaluated == probe.evaluated == 40
    assert probe.right >= proto.right + 10, choice.why()
    assert choice.chosen == "probe" and choice.folds == 5
    assert f"prototype {proto.right} of 40, probe {probe.right} of 40" in choice.why()
    assert "probe answers more" in choice.why()


def test_ties_keep_the_prototypes() -> None:
    x, y = clusters(1)
    choice = choose_head(heads(), x, y, 3)
    assert choice.scores[0].right == choice.scores[1].right == 30  # both answer every held-out example right
    assert choice.chosen == "prototype" and "no head beats prototype" in choice.why()


def test_answers_of_unknown_count_against_a_head() -> None:
    """A threshold that rejects everything: every answer is right by forced choice, none as served."""
    x, y = tilted(2)
    choice = choose_head(heads(open_set=OpenSetRule("global", "euclidean", 1e-9)), x, y, 2)
    assert all(s.right == 0 and s.correct > 0 for s in choice.scores)
    assert choice.chosen == "prototype"
    assert choice.scores[1].to_dict()["accuracy"] == 0.0


def test_too_few_held_out_examples_choose_nothing() -> None:
    x, y = clusters(3, per_class=3, k=3)  # 9 held out < 10
    choice = choose_head(heads(), x, y, 3)
    assert choice.chosen is None and choice.scores[0].evaluated == 9
    assert "at least 10 are needed" in choice.why() and "teach more images" in choice.why()
    one = choose_head(heads(), x[:3], y[:3], 1)  # one class: nothing to choose between
    assert one.chosen is None
    empty = choose_head(heads(), np.zeros((0, 4), np.float32), np.zeros(0, np.int64), 0)
    assert empty.chosen is None and empty.scores[0].evaluated == 0 and empty.scores[0].accuracy is None


def test_bad_arguments_are_named() -> None:
    x, y = clusters(4)
    with pytest.raises(ConfigError, match="at least one candidate"):
        choose_head([], x, y, 3)
    with pytest.raises(ConfigError, match="folds 1 must be >= 2"):
        choose_head(heads(), x, y, 3, folds=1)
