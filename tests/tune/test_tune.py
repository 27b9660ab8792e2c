"""`fewshot tune`: an Optuna study over a config's tune.space on a tiny image folder made here."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fewshot.cli import main
from fewshot.config import load_config
from fewshot.errors import ConfigError
from fewshot.training.data import RunData, load_run_data
from fewshot.workflows.study import storage_url
from fewshot.workflows.tune import redact, tune

CONFIG = """\
name: tiny
data: {dataset: tiny, image_size: 16, split: classes}
model: {backbone: conv4, backbone_args: {hidden: 8}}
train: {steps: 4, way: 3, shot: 1, query: 2, val_every: 2, val_episodes: 8, val_way: 3, val_query: 3,
        checkpoint_every: 4, precision: fp32, device: cpu}
tune:
  startup_trials: 1
  space:
    train.lr: {type: float, low: 0.0003, high: 0.01, log: true}
    train.way: {type: int, low: 2, high: 4}
    model.backbone_args.hidden: {type: categorical, choices: [4, 8]}
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """20 classes of a fixed random pattern plus per-image noise, 6 images each."""
    rng = np.random.default_rng(1)
    for c in range(20):
        pattern = rng.random((16, 16)) < 0.3
        folder = tmp_path / "data" / "tiny" / f"d{c % 2}" / f"k{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            img = pattern ^ (rng.random((16, 16)) < 0.05)
            Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    (tmp_path / "c.yaml").write_text(CONFIG)
    return tmp_path


def _summary(workdir: Path) -> dict:
    return json.loads((workdir / "runs" / "tiny-tune" / "trials.json").read_text())


def test_tune_writes_a_runnable_best_config_and_the_study_resumes(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "c.yaml", "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\ntrial ") == 3 and "best validation accuracy" in out
    folder = workdir / "runs" / "tiny-tune"
    for name in ("study.db", "trials.csv", "trials.json", "history.png", "best_config.yaml"):
        assert (folder / name).is_file(), name
    assert len((folder / "trials.csv").read_text().strip().splitlines()) == 1 + 3
    summary = _summary(workdir)
    assert summary["best_value"] > 0 and (folder / f"trial-{summary['best_trial']:04d}").is_dir()
    assert (folder / "importance.png").is_file() or any("importance" in n for n in summary["notes"])

    best = load_config(folder / "best_config.yaml")
    assert best.name == "tiny-tuned" and best.tune is None and best.train.lr == summary["best_params"]["train.lr"]
    assert main(["train", str(folder / "best_config.yaml"), "train.steps=2"]) == 0
    assert (workdir / "runs" / "tiny-tuned" / "checkpoints" / "best").is_dir()

    assert main(["tune", "c.yaml", "--trials", "1"]) == 0  # joins the same study: 4 trials in all
    assert "3 trials so far" in capsys.readouterr().out
    assert [t["number"] for t in _summary(workdir)["trials"]] == [0, 1, 2, 3]


def test_a_clearly_worse_trial_is_pruned(workdir: Path) -> None:
    import optuna

    config = load_config("c.yaml", ["train.steps=8", "train.val_every=4", "tune.warmup_steps=4"])
    url = storage_url(None, workdir / "runs" / "tiny-tune")
    (workdir / "runs" / "tiny-tune").mkdir(parents=True)
    study = optuna.create_study(storage=url, study_name="tiny", direction="maximize")
    study.enqueue_trial({"train.lr": 0.005, "train.way": 4, "model.backbone_args.hidden": 8})
    study.enqueue_trial({"train.lr": 0.0003, "train.way": 2, "model.backbone_args.hidden": 4})  # hardly learns
    res = tune(config, trials=2, progress=False, echo=lambda _: None)
    assert res.counts == {"complete": 1, "pruned": 1}
    pruned = _summary(workdir)["trials"][1]
    assert pruned["state"] == "pruned" and pruned["last_step"] < 8


@pytest.mark.parametrize(("space", "expected"), [
    ("train.lr: {type: float, low: 0.01, high: 0.001}", "low 0.01 must be < high 0.001"),
    ("train.lr: {type: float, low: 0, high: 0.01, log: true}", "log scale needs low > 0"),
    ("model.backbone_args.hidden: {type: categorical, choices: []}", "non-empty list of choices"),
    ("train.lrate: {type: float, low: 0.001, high: 0.01}", "'train.lrate' is not a config field"),
    ("train.way: {type: int, low: 1, high: 5}", "the value 1 gives an invalid config"),
    ("train.val_way: {type: int, low: 2, high: 5}", "'train.val_way' cannot be tuned"),
])
def test_bad_search_spaces_are_refused_with_the_fix(
        workdir: Path, capsys: pytest.CaptureFixture[str], space: str, expected: str) -> None:
    (workdir / "bad.yaml").write_text(CONFIG.split("  space:")[0] + "  space:\n    " + space + "\n")
    assert main(["tune", "bad.yaml", "--trials", "1"]) == 2
    assert expected in capsys.readouterr().err
    assert not (workdir / "runs").exists()  # refused before any trial


def test_an_unreachable_storage_is_named_without_its_password(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://user:secret@127.0.0.1:1/db"
    assert main(["tune", "c.yaml", "--trials", "1", "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "postgresql+psycopg://user:***@127.0.0.1:1/db" in err and "--storage" in err
    assert "secret" not in err
    assert redact("postgresql://u:p@ss@h/db") == "postgresql://u:***@h/db"


def test_a_config_without_a_validation_split_is_refused(workdir: Path) -> None:
    config = load_config("c.yaml")
    full = load_run_data(config.data, progress=False)
    no_val = RunData(full.cache, {k: v for k, v in full.splits.items() if k != "val"}, full.scheme)
    with pytest.raises(ConfigError, match="no validation split.*never on test classes"):
        tune(config, trials=1, data=no_val, progress=False, echo=lambda _: None)
    assert not list((workdir / "runs" / "tiny-tune").glob("trial-*"))


def test_a_config_without_a_search_space_is_refused(workdir: Path) -> None:
    with pytest.raises(ConfigError, match="no tune.space"):
        tune(load_config("c.yaml", ["tune=null"]), trials=1, progress=False)


def test_a_distill_config_tunes_its_distillation_terms(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = CONFIG.split("tune:")[0].replace("name: tiny", "name: teacher")
    (workdir / "teacher.yaml").write_text(teacher)
    assert main(["train", "teacher.yaml"]) == 0
    (workdir / "student.yaml").write_text(
        CONFIG.split("  space:")[0].replace("name: tiny", "name: student")
        + "  space:\n    distill.temperature: {type: float, low: 1.0, high: 8.0}\n"
        + "distill: {teachers: [{path: runs/teacher}], kd_episode_weight: 1.0, rkd_distance_weight: 1.0}\n")
    assert main(["tune", "student.yaml", "--trials", "2"]) == 0
    folder = workdir / "runs" / "student-tune"
    best = load_config(folder / "best_config.yaml")
    assert best.distill is not None and 1.0 <= best.distill.temperature <= 8.0
    manifest = json.loads((folder / "trial-0000" / "checkpoints" / "last" / "manifest.json").read_text())
    assert "teachers" in json.dumps(manifest)  # trained with the distillation objective
    (workdir / "gens.yaml").write_text((workdir / "student.yaml").read_text().replace(
        "rkd_distance_weight: 1.0}", "rkd_distance_weight: 1.0, generations: 2}"))
    assert main(["tune", "gens.yaml", "--trials", "1"]) == 2
    assert "set distill.generations=1" in capsys.readouterr().err


def _postgres_server() -> Any:
    """tests/service/postgres_server.py (a throwaway server), loaded by path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "service" / "postgres_server.py"
    spec = importlib.util.spec_from_file_location("tune_postgres_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.postgres
def test_workers_on_two_machines_join_one_postgresql_study(workdir: Path) -> None:
    pg = _postgres_server()
    bin_dir = pg.find_pg_bin()
    if bin_dir is None:
        # `from conftest import ...` picked whichever conftest module was imported first (tests/artifacts'
        # when collected together); this is tests/conftest.py's require_or_skip, inline
        reason = "PostgreSQL binaries (initdb, pg_ctl) not found; apt-get install -y postgresql"
        if os.environ.get("FEWSHOT_REQUIRE_ALL", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"required in CI but unavailable: {reason}")
        pytest.skip(reason)
    with pg.postgres_server(bin_dir) as url:
        assert url.startswith("postgresql://")
        assert main(["tune", "c.yaml", "--trials", "2", "--storage", url]) == 0
        # a second worker with its own run folders (another machine), same command and study
        assert main(["tune", "c.yaml", "output_dir=elsewhere", "--trials", "1", "--storage", url]) == 0
        there = json.loads((workdir / "elsewhere" / "tiny-tune" / "trials.json").read_text())
        assert [t["number"] for t in there["trials"]] == [0, 1, 2] and there["storage"].startswith(
            "postgresql+psycopg://")
        assert (workdir / "elsewhere" / "tiny-tune" / "trial-0002").is_dir()
        assert not (workdir / "elsewhere" / "tiny-tune" / "trial-0000").exists()


def test_a_trial_at_its_last_step_is_complete_not_pruned() -> None:
    import optuna

    from fewshot.workflows.tune import _reporter

    class AlwaysBelowMedian:
        reported: list[tuple[float, int]] = []

        def report(self, value: float, step: int) -> None:
            self.reported.append((value, step))

        def should_prune(self) -> bool:
            return True

    trial = AlwaysBelowMedian()
    on_step = _reporter(trial, last_step=8)
    on_step(3, {"loss": 1.0})  # not a validation step: nothing reported
    on_step(8, {"loss": 1.0, "val_acc": 0.4})
    with pytest.raises(optuna.TrialPruned, match="at step 4"):
        on_step(4, {"loss": 1.0, "val_acc": 0.3})
    assert trial.reported == [(0.4, 8), (0.3, 4)]


def test_sampled_values_keep_their_type_in_free_form_sections(workdir: Path) -> None:
    from fewshot.workflows.tune import with_params

    cfg = with_params(load_config("c.yaml"), {"model.learner_args.inner_lr": 5e-05, "train.lr": 1e-05})
    assert cfg.model.learner_args["inner_lr"] == 5e-05 and cfg.train.lr == 1e-05  # not the string '5e-05'


def test_a_named_study_has_its_own_folder_and_a_changed_base_config_is_refused(workdir: Path) -> None:
    config = load_config("c.yaml")
    quiet: dict[str, Any] = {"progress": False, "echo": lambda _: None}
    first = tune(config, trials=1, **quiet)
    other = tune(config, trials=1, study_name="second", **quiet)
    assert first.study_dir != other.study_dir and (other.study_dir / "trial-0000").is_dir()
    changed = load_config("c.yaml", ["train.steps=6"])
    with pytest.raises(ConfigError, match="another base config.*--study NEW_NAME"):
        tune(changed, trials=1, **quiet)


def test_a_study_started_before_a_config_field_existed_is_joined(workdir: Path) -> None:
    """A field added to the config since a study began (with its default) is not "another base config"."""
    import optuna

    config = load_config("c.yaml")
    quiet: dict[str, Any] = {"progress": False, "echo": lambda _: None}
    first = tune(config, trials=1, **quiet)
    study = optuna.load_study(study_name=config.name, storage=storage_url(None, first.study_dir))
    old = study.user_attrs["base_config_dict"]
    del old["train"]["val_domain_mode"]  # as a study saved before the field existed,
    study.set_user_attr("base_config_dict", old)
    study.set_user_attr("base_config", "fingerprint-of-an-older-version")  # whose hash today's code does not reproduce
    again = tune(config, trials=1, **quiet)  # joins: the saved config read today is this config
    assert again.study_dir == first.study_dir
    with pytest.raises(ConfigError, match="another base config"):
        tune(load_config("c.yaml", ["train.steps=6"]), trials=1, **quiet)


def test_a_failing_trial_fails_alone_and_the_outputs_are_written(workdir: Path) -> None:
    """A way of 30 cannot be served by 20 classes: each such trial fails, the study goes on."""
    config = load_config("c.yaml", ["tune.space={train.way: {type: categorical, choices: [30]}}"])
    res = tune(config, trials=3, progress=False, echo=lambda _: None)
    assert res.counts == {"fail": 3} and res.best_config is None
    assert res.files["trials_json"].is_file()


def test_fields_that_change_the_scoring_cannot_be_tuned(workdir: Path) -> None:
    for path in ("seed", "data.lake_val_fraction", "distill.generations"):
        with pytest.raises(ConfigError, match="cannot be tuned"):
            load_config("c.yaml", [f"tune.space={{{path}: {{type: int, low: 0, high: 2}}}}"])
