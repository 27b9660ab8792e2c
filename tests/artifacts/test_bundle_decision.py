"""The manifest stores the served decision typed (`Manifest.decision`); manifests written before it
map their old fields (deployment rule, calibration rules or legacy raw-score thresholds) to it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fewshot.artifacts.bundle import BUNDLE_FORMAT_VERSION, Manifest
from fewshot.decision import BundleDecision, DecisionRule, OpenSetRule
from fewshot.errors import CheckpointError


def manifest(**kw: Any) -> Manifest:
    base: dict[str, Any] = dict(format_version=BUNDLE_FORMAT_VERSION, bundle_id="b", backbone={}, preprocessing={},
                                embedding_dim=4, source={}, data_fingerprint="", metrics={}, calibration=None,
                                versions={}, sha256={}, parity={})
    return Manifest(**{**base, **kw})


OLD_CALIBRATION = {"n_episodes": 200, "n_query": 5, "n_shot": 5, "n_way": 5, "target_false_accept": 0.05,
                   "thresholds": {"cosine": 0.95, "euclidean": 7.4}, "true_accept": {"cosine": 0.7, "euclidean": 0.7}}
PROBE = DecisionRule("probe", "cosine", cosine_scale=4.0, probe_c=0.1, probe_max_iter=50)


def test_an_old_manifest_maps_its_rule_and_legacy_thresholds_to_the_decision() -> None:
    m = manifest(deployment={"rule": PROBE.to_dict()}, calibration=OLD_CALIBRATION)
    d = BundleDecision.from_dict(m.decision or {})
    assert d.rule == PROBE
    assert d.open_set == {"euclidean": OpenSetRule("global", "euclidean", 7.4),
                          "cosine": OpenSetRule("global", "cosine", 1.0 - 0.95)}  # accept cos >= t: 1 - cos <= 1 - t
    assert json.loads(m.to_json())["decision"] == d.to_dict()


def test_a_manifest_without_rule_or_calibration_serves_the_default() -> None:
    assert BundleDecision.from_dict(manifest().decision or {}) == BundleDecision(DecisionRule("prototype", "euclidean"))


def test_calibrated_rules_win_over_legacy_thresholds() -> None:
    spread = OpenSetRule("spread", "euclidean", 2.0, prior_spread=3.0)
    m = manifest(calibration={**OLD_CALIBRATION, "rules": {"euclidean": spread.to_dict()}})
    assert BundleDecision.from_dict(m.decision or {}).open_set == {"euclidean": spread}


def test_a_stored_decision_reads_back_and_a_disagreeing_one_is_refused() -> None:
    d = BundleDecision(PROBE, {"cosine": OpenSetRule("spread", "cosine", 0.5)})
    text = manifest(decision=d.to_dict()).to_json()
    assert BundleDecision.from_dict(Manifest.from_json(text, where="t").decision or {}) == d
    with pytest.raises(CheckpointError, match="disagrees with its deployment rule"):
        manifest(decision=d.to_dict(), deployment={"rule": DecisionRule().to_dict()})
    with pytest.raises(CheckpointError, match="decision cannot be read.*unknown"):
        manifest(decision={"rule": {"rule": "knn"}, "open_set": {}})
