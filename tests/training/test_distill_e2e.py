"""Distillation end to end on a tiny synthetic collection: a wide teacher trained here teaches a
narrow student, which beats the same student trained alone with the same budget on the same
held-out test episodes; plus the bad inputs of `fewshot distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from synthetic_runs import config, run_data, synthetic_cache

from fewshot.config import RunConfig
from fewshot.distill import distill
from fewshot.distill.report import load_report, report_dir
from fewshot.episodes.sampling import EpisodeSpec
from fewshot.errors import CheckpointError, ConfigError
from fewshot.training.data import RunData
from fewshot.training.evaluate import evaluate_episodes
from fewshot.training.loop import train
from fewshot.training.runs import load_trained

EVAL = {"episodes": 600, "way": 5, "shot": 1, "query": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> RunData:
    return run_data(synthetic_cache(tmp_path_factory.mktemp("cache"), n_classes=30, per_class=10))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory, data: RunData) -> Path:
    cfg = config(tmp_path_factory.mktemp("teacher"), name="teacher", model={"backbone_args": {"hidden": 32}},
                 steps=150, way=5, shot=1, query=5, val_every=150, lr=3e-3, extra={"eval": EVAL})
    train(cfg, data=data, progress=False)
    return cfg.run_dir()


def student(tmp_path: Path, teacher: Path, **distill: Any) -> RunConfig:
    d = {"teachers": [{"path": str(teacher)}], "kd_episode_weight": 1.0, "temperature": 4.0, **distill}
    return config(tmp_path, name="student", model={"backbone_args": {"hidden": 4}}, steps=30, way=5, shot=1,
                  query=5, val_every=30, lr=3e-3, extra={"eval": EVAL, "distill": d})


@pytest.mark.slow
def test_distilled_student_beats_the_student_alone(tmp_path: Path, teacher: Path, data: RunData) -> None:
    cfg = student(tmp_path, teacher, rkd_distance_weight=1.0, rkd_angle_weight=2.0, hint_weight=0.1)
    summary = distill(cfg, data=data, progress=False)
    assert set(summary["runs"]) == {"student", "student-alone"}
    report = load_report(report_dir(cfg))
    assert report is not None
    rows = {r["role"]: r for r in report["rows"]}
    alone = rows["student alone"]["accuracy"]["5w1s"]["mean"]
    distilled = rows["distilled (generation 1)"]["accuracy"]["5w1s"]["mean"]
    teacher_acc = rows["teacher"]["accuracy"]["5w1s"]["mean"]
    print(f"teacher {teacher_acc:.4f}, alone {alone:.4f}, distilled {distilled:.4f}")
    assert distilled > alone + 0.01, (alone, distilled, teacher_acc)
    assert rows["teacher"]["params"] > 10 * rows["student alone"]["params"]
    assert (report_dir(cfg) / "accuracy_vs_latency.png").is_file()
    # the report's numbers are the protocol's: re-evaluate the distilled student independently
    learner, _ = load_trained(cfg.run_dir())
    again = evaluate_episodes(learner.predict, data.cache, data.pool("test"), EpisodeSpec(5, 1, 5), episodes=600,
                              seed=cfg.eval.seed, progress=False)
    assert again.mean == pytest.approx(distilled)
    # a distilled run exports like any run, measured as served
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.export import export_run
    from fewshot.training.protocol import evaluate_run

    evaluate_run(cfg.run_dir(), way=5, shot=1, query=5, episodes=600, data=data, progress=False, device="cpu")
    bundle = load_bundle(export_run(cfg.run_dir(), tmp_path / "bundle", data=data))
    assert bundle.manifest.metrics["test_5w1s_any"]["served_mean"] >= distilled - 0.01


def test_several_teachers_and_born_again_generations(tmp_path: Path, teacher: Path, data: RunData) -> None:
    cfg = student(tmp_path, teacher, generations=2, baseline=False)
    cfg = RunConfig.model_validate({**cfg.to_dict(), "distill": {
        **cfg.to_dict()["distill"], "teachers": [{"path": str(teacher), "weight": 0.7},
                                                 {"path": str(teacher), "weight": 0.3}]}})
    summary = distill(cfg, data=data, progress=False, report=False)
    assert set(summary["runs"]) == {"student-gen1", "student-gen2"}
    gen2 = (tmp_path / "runs" / "student-gen2" / "config.yaml").read_text()
    assert "student-gen1" in gen2  # generation 2 is taught by generation 1
    metrics = (tmp_path / "runs" / "student-gen1" / "metrics.csv").read_text().splitlines()[0]
    assert "kd_episode" in metrics and "task" in metrics


def test_bad_distillation_inputs_are_refused(tmp_path: Path, teacher: Path, data: RunData) -> None:
    with pytest.raises(ConfigError, match="temperature"):
        student(tmp_path, teacher, temperature=0.0)
    with pytest.raises(ConfigError, match="kd_episode_weight"):
        student(tmp_path, teacher, kd_episode_weight=-1.0)
    with pytest.raises(CheckpointError, match="neither a run folder"):
        distill(student(tmp_path, tmp_path / "nowhere"), data=data, progress=False)
    with pytest.raises(ConfigError, match="distill section"):
        train(student(tmp_path, teacher), data=data, progress=False)
    # a teacher trained on the student's test classes is a leak: refused, naming the classes
    leaky = RunData(data.cache, {**data.splits, "test": data.splits["train"]}, "synthetic")
    with pytest.raises(ConfigError, match=r"trained on 12 classes of the student's test split .*D0/c0"):
        distill(student(tmp_path, teacher), data=leaky, progress=False)


def test_resume_with_a_changed_teacher_is_refused(tmp_path: Path, teacher: Path, data: RunData) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    mine = tmp_path / "teacher-copy"
    shutil.copytree(teacher, mine)
    cfg = student(tmp_path, mine, baseline=False)
    distill(cfg, data=data, progress=False, report=False)
    last = cfg.run_dir() / "checkpoints" / "last" / "model.safetensors"
    before = last.read_bytes()
    weights = mine / "checkpoints" / "best" / "model.safetensors"  # same path, other weights
    state = load_file(str(weights))
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    longer = RunConfig.model_validate({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "steps": 40}})
    with pytest.raises(CheckpointError, match="the teacher changed"):
        distill(longer, data=data, progress=False, report=False)
    assert last.read_bytes() == before  # nothing already written is lost
