"""Every learner family exports a bundle that is measured as served (ONNX Runtime + the service's
decision rule on the run's test episodes) and stays within 1 point of the learner's accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_runs import config, run_data, synthetic_cache

from fewshot.artifacts.bundle import load_bundle
from fewshot.artifacts.export import ExportRefused, export_run
from fewshot.training.data import RunData
from fewshot.training.loop import train
from fewshot.training.protocol import evaluate_run

FAMILIES = {
    "protonet": {},
    "maml": {"inner_lr": 0.4},
    "fomaml": {"inner_lr": 0.4},
    "anil": {"inner_lr": 0.4},
    "metasgd": {"inner_lr": 0.4},
    "reptile": {"inner_steps": 2, "eval_inner_steps": 3},
    "pretrain": {},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RunData:
    return run_data(synthetic_cache(tmp_path_factory.mktemp("cache"), n_classes=30, per_class=10))


@pytest.mark.slow
@pytest.mark.parametrize("learner", sorted(FAMILIES))
def test_every_family_exports_what_it_evaluates(learner: str, tmp_path: Path, data: RunData) -> None:
    cfg = config(tmp_path, learner, model={"learner_args": FAMILIES[learner]}, steps=40, val_every=40,
                 batch_size=32, lr=3e-3, extra={"eval": {"episodes": 600, "way": 3, "shot": 2, "query": 5},
                                                 "export": {"calibration_episodes": 20, "bn_episodes": 50}})
    train(cfg, data=data, progress=False)
    learner_acc = evaluate_run(cfg.run_dir(), way=3, shot=2, query=5, episodes=600, data=data, progress=False,
                               device="cpu")
    assert learner_acc.mean > 1 / 3 + 0.1  # learned something on unseen classes
    bundle = load_bundle(export_run(cfg.run_dir(), tmp_path / "bundle", data=data))
    m = bundle.manifest.metrics["test_3w2s_any"]
    assert m["mean"] == pytest.approx(learner_acc.mean)
    assert m["served_mean"] >= m["mean"] - 0.01, m
    dep = bundle.manifest.deployment
    assert dep is not None and dep["learner"] == learner
    gradient_based = learner in ("maml", "fomaml", "anil", "metasgd", "reptile")
    assert dep["embedder"] == ("bn-reestimated" if gradient_based else "backbone")
    assert dep["rule"]["rule"] == ("probe" if learner == "pretrain" else "prototype")
    if gradient_based:  # running statistics were re-estimated, not the untrained mean 0 / variance 1
        bn = bundle._backbone.encoder[0][1]
        assert float(bn.running_var.sub(1).abs().max()) > 1e-3


def test_export_refuses_a_bundle_worse_than_its_learner(tmp_path: Path, data: RunData, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, "maml", steps=20, val_every=20,
                 extra={"eval": {"episodes": 600, "way": 3, "shot": 2, "query": 5}, "export": {"calibration_episodes": 20}})
    train(cfg, data=data, progress=False)
    evaluate_run(cfg.run_dir(), way=3, shot=2, query=5, episodes=600, data=data, progress=False, device="cpu")
    # a deployment that is not the evaluated model (here: its last layer's weights lost) must be caught
    import fewshot.artifacts.export as deploy

    def broken(learner, *a):  # type: ignore[no-untyped-def]
        backbone = deploy._plain_copy(learner.backbone).eval()
        backbone.encoder[-1][0].weight.data.zero_()
        return backbone

    monkeypatch.setattr(deploy, "deployable_backbone", broken)
    with pytest.raises(ExportRefused, match="points below the learner's"):
        export_run(cfg.run_dir(), tmp_path / "bad", data=data)
    assert not (tmp_path / "bad").exists()
    forced = load_bundle(export_run(cfg.run_dir(), tmp_path / "forced", data=data, force=True))
    assert forced.manifest.metrics["test_3w2s_any"]["drop"] > 0.01
