"""Training loop, exact resume, evaluation protocol, on a tiny synthetic collection."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic_runs import config, run_data, synthetic_cache

from fewshot.config import config_from_dict, load_config
from fewshot.episodes.sampling import EpisodeSpec
from fewshot.errors import CheckpointError, ConfigError, EpisodeError
from fewshot.training.data import RunData
from fewshot.training.evaluate import evaluate_episodes, mean_ci95
from fewshot.training.loop import lr_at, train
from fewshot.training.protocol import check_no_training_classes, evaluate_run
from fewshot.training.runs import load_trained
from fewshot.workflows.compare import compare_runs


@pytest.fixture
def data(tmp_path: Path) -> RunData:
    return run_data(synthetic_cache(tmp_path))


def test_train_writes_run_folder_and_learns(tmp_path: Path, data: RunData) -> None:
    cfg = config(tmp_path, steps=30, val_every=10)
    res = train(cfg, data=data, progress=False)
    run = cfg.run_dir()
    for name in ("config.yaml", "metrics.csv", "curves.png", "train_classes.json", "train_summary.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
    assert res.best_val_acc > 1 / 3 + 0.15  # well above 3-way chance on unseen classes
    echoed = load_config(run / "config.yaml")
    assert echoed == cfg


def test_validation_draws_its_episodes_as_val_domain_mode_says(tmp_path: Path, data: RunData) -> None:
    # the 6 val classes lie in 3 domains of 2: 2-way episodes fit within one domain, 3-way do not
    within2 = train(config(tmp_path, name="w2", steps=3, val_way=2, val_domain_mode="within"), data=data, progress=False)
    anywhere2 = train(config(tmp_path, name="a2", steps=3, val_way=2), data=data, progress=False)
    assert within2.best_val_acc != anywhere2.best_val_acc  # same model, other episodes
    with pytest.raises(EpisodeError, match="within"):
        train(config(tmp_path, name="w3", steps=3, val_way=3, val_domain_mode="within"), data=data, progress=False)


def test_training_names_the_domains_within_episodes_never_draw(tmp_path: Path, data: RunData) -> None:
    splits = dict(data.splits)
    train_split = splits["train"]
    splits["train"] = type(train_split)("train", train_split.class_ids[:11], train_split.rotations[:11])  # D2: 3 classes
    short = RunData(data.cache, splits, data.scheme)
    with pytest.warns(UserWarning, match=r"never draw from the 1 domains with fewer than 4 training classes of 5\+ "
                      r"images: D2 \(3\)"):
        train(config(tmp_path, name="w", steps=1, domain_mode="within", val_every=100), data=short, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config(tmp_path, name="ok", steps=1, domain_mode="within", val_every=100), data=data, progress=False)
    assert not [w for w in caught if "never draw" in str(w.message)]  # every domain has 4: nothing to say


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_resume_after_kill_reproduces_uninterrupted_run(tmp_path: Path, data: RunData, schedule: str) -> None:
    full = config(tmp_path / "a", schedule=schedule, warmup=2, step_every=2)
    train(full, data=data, progress=False)

    killed = config(tmp_path / "b", schedule=schedule, warmup=2, step_every=2)

    def kill(step: int, _: dict[str, float]) -> None:
        if step == 4:  # after the step-3 checkpoint, before the step-6 one
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(killed, data=data, progress=False, on_step=kill)
    train(killed, data=data, progress=False)
    a = load_file(str(full.run_dir() / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(killed.run_dir() / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = (killed.run_dir() / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6  # header + one row per step, no duplicates from the killed attempt

    def column(run: Path, name: str) -> list[str]:
        with open(run / "metrics.csv", newline="") as fh:
            return [r[name] for r in csv.DictReader(fh)]

    # the same schedule and the same episodes: every step's learning rate and loss as uninterrupted
    assert column(killed.run_dir(), "lr") == column(full.run_dir(), "lr")
    assert column(killed.run_dir(), "loss") == column(full.run_dir(), "loss")


def test_resume_with_a_changed_config_is_refused(tmp_path: Path, data: RunData) -> None:
    train(config(tmp_path), data=data, progress=False)
    with pytest.raises(CheckpointError, match=r"train.lr: 0.001 -> 0.01"):
        train(config(tmp_path, lr=1e-2), data=data, progress=False)


def test_a_run_saved_before_a_config_field_existed_resumes_with_its_default(tmp_path: Path, data: RunData) -> None:
    import json

    cfg = config(tmp_path, steps=6)
    train(cfg, data=data, progress=False)
    path = cfg.run_dir() / "checkpoints" / "last" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["config"]["train"]["hflip"]  # as written by a version without the field
    path.write_text(json.dumps(manifest))
    train(config(tmp_path, steps=8), data=data, progress=False)  # resumes: the default is what it ran with
    manifest["config"]["train"]["crop_pad"] = 4  # a real difference is still refused
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"train.crop_pad: 4 -> 0"):
        train(config(tmp_path, steps=10), data=data, progress=False)


@pytest.mark.parametrize("learner", ["maml", "reptile", "pretrain"])
def test_other_learner_kinds_run_through_the_loop(tmp_path: Path, data: RunData, learner: str) -> None:
    cfg = config(tmp_path, learner, steps=3, val_every=3, batch_size=16)
    train(cfg, data=data, progress=False)
    trained, manifest = load_trained(cfg.run_dir())
    assert manifest["model"]["learner"]["name"] == learner
    assert trained.predict(_episode(data)).shape == (3 * 2, 3)


def _episode(data: RunData):  # type: ignore[no-untyped-def]
    from fewshot.episodes import EpisodeDataset

    return EpisodeDataset(data.cache, data.pool("test"), EpisodeSpec(3, 1, 2), seed=0)[0]


def test_evaluation_is_identical_for_identical_seeds_and_reports_ci(tmp_path: Path, data: RunData) -> None:
    cfg = config(tmp_path)
    train(cfg, data=data, progress=False)
    learner, _ = load_trained(cfg.run_dir())
    kw = dict(episodes=30, seed=9, progress=False, enforce_protocol=False)
    a = evaluate_episodes(learner.predict, data.cache, data.pool("test"), EpisodeSpec(3, 1, 5), **kw)
    b = evaluate_episodes(learner.predict, data.cache, data.pool("test"), EpisodeSpec(3, 1, 5), **kw)
    assert a.accuracies == b.accuracies and a.mean == b.mean
    assert 0 < a.ci95 < 0.5 and set(a.per_domain) <= {"D0", "D1", "D2"}
    with pytest.raises(EpisodeError, match="at least 600 test episodes"):
        evaluate_episodes(learner.predict, data.cache, data.pool("test"), EpisodeSpec(3, 1, 5), episodes=100)


def test_mean_ci95_matches_formula() -> None:
    accs = np.array([0.5, 0.7, 0.9, 0.6])
    mean, ci = mean_ci95(accs)
    assert mean == pytest.approx(0.675)
    # worked by hand: sample variance 0.0875 / 3, so 1.96 * sqrt(0.0291667) / sqrt(4) = 0.167367
    # (the population std would give 0.144944; 1.96 standard deviations 0.334734)
    assert ci == pytest.approx(0.167367, abs=1e-6)


def test_evaluating_on_training_classes_is_refused(tmp_path: Path, data: RunData) -> None:
    cfg = config(tmp_path)
    train(cfg, data=data, progress=False)
    with pytest.raises(EpisodeError, match="shares 12 classes"):
        check_no_training_classes(cfg.run_dir(), data, "train")
    check_no_training_classes(cfg.run_dir(), data, "test")


def test_evaluate_run_and_compare(tmp_path: Path, data: RunData) -> None:
    cfg = config(tmp_path)
    train(cfg, data=data, progress=False)
    res = evaluate_run(cfg.run_dir(), way=3, shot=1, query=5, episodes=600, data=data, progress=False, device="cpu")
    assert res.episodes == 600 and (cfg.run_dir() / "eval-test-3w1s-any.json").is_file()
    table = compare_runs([cfg.run_dir()], tmp_path / "cmp.png")
    assert "3-way 1-shot" in table and (tmp_path / "cmp.png").stat().st_size > 1000


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown field 'train.stpes'"):
        config_from_dict({"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match="train.lr"):
        config_from_dict({"train": {"lr": -1}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["train.steps"])
    assert load_config(None, ["train.steps=7", "model.learner=maml"]).train.steps == 7


def test_data_normalisation_reaches_the_cache_preprocessing_or_names_the_bad_value() -> None:
    from fewshot.training.data import preprocessing_of

    cfg = config_from_dict({"data": {"mode": "RGB", "image_size": 32, "crop": 0.875,
                                     "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}})
    pre = preprocessing_of(cfg.data)
    assert (pre.mean, pre.std, pre.crop, pre.size) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), 0.875, 32)
    with pytest.raises(ConfigError, match=r"data: .*mean \[0.5\] has 1 value.*give 3"):
        config_from_dict({"data": {"mode": "RGB", "mean": [0.5], "std": [0.2]}})
    with pytest.raises(ConfigError, match="give both or neither"):
        config_from_dict({"data": {"mode": "L", "mean": [0.5]}})


def test_unknown_learner_lists_valid_ones(tmp_path: Path, data: RunData) -> None:
    cfg = config_from_dict({"output_dir": str(tmp_path), "model": {"learner": "nope"}, "data": {"image_size": 16}})
    with pytest.raises(ConfigError, match="valid learners: .*protonet"):
        train(cfg, data=data, progress=False)


def test_lr_schedules() -> None:
    c = config_from_dict({"train": {"lr": 1.0, "schedule": "step", "step_every": 10, "steps": 100}}).train
    assert lr_at(0, c) == 1.0 and lr_at(10, c) == 0.5 and lr_at(25, c) == 0.25
    c = config_from_dict({"train": {"lr": 1.0, "schedule": "cosine", "steps": 100, "warmup": 10}}).train
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(99, c) < 0.01


def test_a_finished_run_can_be_extended_and_timing_accumulates(tmp_path: Path, data: RunData) -> None:
    train(config(tmp_path, steps=3, val_every=10), data=data, progress=False)
    res = train(config(tmp_path, steps=6, val_every=10, max_seconds=100.0), data=data, progress=False)
    assert res.steps == 6
    with open(config(tmp_path).run_dir() / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert len(rows) == 6 and elapsed == sorted(elapsed)


def test_bad_eval_settings_and_devices_are_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="eval.split 'train'"):
        config_from_dict({"eval": {"split": "train"}})
    with pytest.raises(ConfigError, match="eval.episodes"):
        config_from_dict({"eval": {"episodes": 100}})
    from fewshot.training.runs import resolve_device

    with pytest.raises(ConfigError, match="device 'foo'"):
        resolve_device("foo")


def test_worker_stream_equals_in_process_stream(tmp_path: Path, data: RunData) -> None:
    a = config(tmp_path / "a", steps=3, val_every=10)
    b = config(tmp_path / "b", steps=3, val_every=10, num_workers=1)
    train(a, data=data, progress=False)
    train(b, data=data, progress=False)
    wa = load_file(str(a.run_dir() / "checkpoints" / "last" / "model.safetensors"))
    wb = load_file(str(b.run_dir() / "checkpoints" / "last" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_segments_record_each_stretch_and_are_cut_at_the_resumed_checkpoint(tmp_path: Path, data: RunData) -> None:
    from fewshot.training.segments import SegmentLog, cpu_hours

    cfg = config(tmp_path, steps=9)

    def kill(step: int, _: dict[str, float]) -> None:
        if step == 5:  # after the step-3 checkpoint: steps 4 and 5 are lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=data, progress=False, on_step=kill)
    assert [(s["start_step"], s["end_step"]) for s in SegmentLog.read(cfg.run_dir()).segments] == [(0, 3)]
    train(cfg, data=data, progress=False, on_step=lambda step, _: None)
    train(config(tmp_path, steps=12), data=data, progress=False)  # the step schedule may be extended
    segs = SegmentLog.read(cfg.run_dir()).segments
    assert [(s["index"], s["start_step"], s["end_step"]) for s in segs] == [(1, 0, 3), (2, 3, 9), (3, 9, 12)]
    for s in segs:
        assert s["train_seconds"] > 0 and s["threads"] >= 1 and s["world_size"] == 1 and s["torch"] == torch.__version__
        assert cpu_hours(s) == pytest.approx(s["train_seconds"] * s["threads"] / 3600)
    # the run's total training time is the sum of what its segments kept, up to the last checkpoint
    manifest_elapsed = load_trained(cfg.run_dir(), tag="last")[1]["metrics"]["elapsed_s"]
    assert sum(s["train_seconds"] for s in segs) == pytest.approx(manifest_elapsed, abs=0.01 * len(segs))


def test_a_cosine_run_refuses_a_changed_budget(tmp_path: Path, data: RunData) -> None:
    train(config(tmp_path, steps=3, schedule="cosine"), data=data, progress=False)
    with pytest.raises(CheckpointError, match=r"train.steps: 3 -> 6"):
        train(config(tmp_path, steps=6, schedule="cosine"), data=data, progress=False)
    # max_seconds (a stretch's time budget) never changes what the run computes
    train(config(tmp_path, steps=3, schedule="cosine", max_seconds=50.0), data=data, progress=False)


def test_a_checkpoint_of_another_format_is_an_error_not_a_restart(tmp_path: Path, data: RunData) -> None:
    import json

    cfg = config(tmp_path, steps=3)
    train(cfg, data=data, progress=False)
    path = cfg.run_dir() / "checkpoints" / "last" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="has format 99"):
        train(config(tmp_path, steps=6), data=data, progress=False)
    assert json.loads(path.read_text())["step"] == 3  # nothing was overwritten


def test_importing_and_plotting_leave_the_matplotlib_backend_alone(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = (
        "import matplotlib; matplotlib.use('svg'); from pathlib import Path; "
        "import fewshot.training.loop, fewshot.distill.report; from fewshot.training.plots import plot_comparison; "
        f"plot_comparison([('a', '5w1s', 90.0, 1.0)], Path({str(tmp_path / 'c.png')!r}), 't'); "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg" and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
