"""A distillation teacher loaded from a run folder decides with the head export chooses for that run
(issue 17: it used the learner's own rule, while export may choose another metric)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from synthetic_runs import config, run_data, synthetic_cache

import fewshot.artifacts.export as deploy
from fewshot.decision import DecisionRule
from fewshot.distill.teacher import load_teacher
from fewshot.training.loop import train
from fewshot.training.runs import load_trained


def test_a_run_teacher_uses_the_rule_export_chooses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = run_data(synthetic_cache(tmp_path / "cache"))
    cfg = config(tmp_path, "maml", model={"learner_args": {"inner_lr": 0.4}}, steps=4, val_every=4,
                 extra={"export": {"bn_episodes": 4}})
    train(cfg, data=data, progress=False)
    learner, _ = load_trained(cfg.run_dir())
    assert learner.deployment.rule == DecisionRule("prototype", "euclidean")  # the learner's own rule

    def validation(embed: Any, rule: DecisionRule, *args: Any, **kw: Any) -> SimpleNamespace:
        return SimpleNamespace(mean=0.9 if rule.metric == "cosine" else 0.5)  # cosine wins on validation

    monkeypatch.setattr(deploy, "evaluate_embedder", validation)
    backbone = deploy.deployable_backbone(learner, data, cfg)
    chosen, _ = deploy.choose_rule(learner, backbone, data, cfg)
    assert chosen == DecisionRule("prototype", "cosine")  # what export writes into the bundle
    assert load_teacher(cfg.run_dir(), data=data).rule == chosen
