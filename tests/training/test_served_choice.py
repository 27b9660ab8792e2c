"""The probe's C a bundle serves is chosen on validation episodes (`choose_probe_c`): the largest
pooled paired gain over the learner's C above its 95% interval, vetoed where it is significantly
worse at any one shot. The episodes' accuracies are made up here, so the choice is known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synthetic_runs import config, run_data, synthetic_cache

import fewshot.artifacts.served_choice as choice
from fewshot.decision import DecisionRule
from fewshot.training.data import RunData

EPISODES = 400


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RunData:
    return run_data(synthetic_cache(tmp_path_factory.mktemp("cache"), n_classes=24, per_class=10))


class _Result:
    def __init__(self, accuracies: np.ndarray) -> None:
        self.accuracies = accuracies


def fake_episodes(effects: dict[tuple[float, int], float], calls: list[dict[str, Any]]) -> Any:
    """evaluate_embedder's stand-in: per episode a base accuracy shared by every C (paired), plus
    `effects[(C, shot)]` and a little noise of its own."""

    def evaluate(embed: Any, rule: DecisionRule, data: RunData, **kw: Any) -> _Result:
        calls.append({"c": rule.probe_c, **kw})
        base = np.random.default_rng([kw["shot"], 1]).uniform(0.4, 0.8, kw["episodes"])
        own = np.random.default_rng([kw["shot"], int(rule.probe_c * 100)]).normal(0, 0.01, kw["episodes"])
        return _Result(base + effects.get((rule.probe_c, kw["shot"]), 0.0) + own)

    return evaluate


def choose(tmp_path: Path, data: RunData, monkeypatch: pytest.MonkeyPatch, effects: dict[tuple[float, int], float],
           *, rule: DecisionRule | None = None, **export: Any) -> tuple[DecisionRule, dict[str, Any], list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(choice, "evaluate_embedder", fake_episodes(effects, calls))
    cfg = config(tmp_path, "pretrain", extra={"eval": {"way": 5, "shot": 1, "query": 15},
                                              "export": {"view_episodes": EPISODES, **export}})
    got, report = choice.choose_probe_c(lambda x: x, rule or DecisionRule("probe", "cosine"), data, cfg)
    return got, report, calls


def test_auto_keeps_the_c_that_gains_on_validation(tmp_path: Path, data: RunData, monkeypatch: pytest.MonkeyPatch) -> None:
    effects = {(2.0, 5): 0.005, (4.0, 5): 0.015, (8.0, 5): 0.01}
    rule, report, calls = choose(tmp_path, data, monkeypatch, effects, probe_c="auto", probe_c_shots=[1, 5])
    assert rule.probe_c == 4.0 and report["probe_c"] == 4.0
    assert rule.views == "none" and rule.rule == "probe"  # only C changes
    assert {(c["c"], c["shot"]) for c in calls} == {(c, s) for c in (1.0, 2.0, 4.0, 8.0) for s in (1, 5)}
    assert all(c["split"] == "val" and c["episodes"] == EPISODES for c in calls)  # never the test classes
    assert calls[0]["query"] == 10 - 5  # the largest shot leaves 5 of each validation class's 10 images
    assert report["gain"]["4"]["by_shot"]["5"]["mean"] == pytest.approx(0.015, abs=0.003)


def test_a_c_worse_at_one_shot_is_refused_however_much_it_gains_at_another(
        tmp_path: Path, data: RunData, monkeypatch: pytest.MonkeyPatch) -> None:
    effects = {(2.0, 5): 0.01, (8.0, 5): 0.05, (8.0, 1): -0.01}
    rule, report, _ = choose(tmp_path, data, monkeypatch, effects, probe_c="auto", probe_c_shots=[1, 5])
    assert report["gain"]["8"]["mean"] > report["gain"]["2"]["mean"]
    assert rule.probe_c == 2.0


def test_no_significant_gain_keeps_the_learners_c(tmp_path: Path, data: RunData, monkeypatch: pytest.MonkeyPatch) -> None:
    rule, report, calls = choose(tmp_path, data, monkeypatch, {}, probe_c="auto")
    assert rule.probe_c == 1.0 and report["probe_c"] == 1.0
    assert {c["shot"] for c in calls} == {1}  # no shots named: the eval shot


@pytest.mark.parametrize(("setting", "expected", "by"), [(None, 1.0, "the learner's"), (3.0, 3.0, "export.probe_c")])
def test_a_named_or_absent_setting_measures_nothing(tmp_path: Path, data: RunData, monkeypatch: pytest.MonkeyPatch,
                                                    setting: float | None, expected: float, by: str) -> None:
    rule, report, calls = choose(tmp_path, data, monkeypatch, {}, probe_c=setting)
    assert (rule.probe_c, report["chosen_by"], calls) == (expected, by, [])


def test_a_prototype_head_has_no_c_to_choose(tmp_path: Path, data: RunData, monkeypatch: pytest.MonkeyPatch) -> None:
    proto = DecisionRule("prototype", "euclidean")
    rule, report, calls = choose(tmp_path, data, monkeypatch, {(4.0, 1): 0.2}, rule=proto, probe_c="auto")
    assert rule == proto and calls == [] and report == {"chosen_by": "no probe head"}


def test_a_bad_setting_is_refused_naming_it(tmp_path: Path) -> None:
    from fewshot.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="probe_c"):
        config(tmp_path, "pretrain", extra={"export": {"probe_c": -2}})
