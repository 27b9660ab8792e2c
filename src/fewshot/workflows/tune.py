"""`fewshot tune CONFIG --trials N`: an Optuna study over the config's `tune.space`.

Each parameter of the space is a dotted config path ("train.lr", "model.backbone_args.hidden")
whose sampled value is set in the config as is. A trial trains `config + sampled values` with
`fewshot.training.loop.train` (a config with a `distill` section: with the distillation objective
of `fewshot distill`, one student taught by `distill.teachers`) into
`<output_dir>/<name>-tune/trial-NNNN`, reports its validation accuracy at every validation step
(the median pruner stops trials below the median of earlier ones at the same step) and is scored
by its best validation accuracy. Trials never see test classes: only the validation split scores
them, and a config without one is refused.

The study lives in an Optuna RDB storage: `<output_dir>/<name>-tune/study.db` (SQLite) by default,
or a PostgreSQL URL, so that workers on several machines join one study by running the same
command; running the command again adds `--trials` more trials to the same study. After the
trials: `best_config.yaml` (a runnable config: `fewshot train best_config.yaml`, or `fewshot
distill` when it has a distill section), `trials.csv`,
`trials.json`, `history.png` and, when it can be computed, `importance.png`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.config import (
    ParamSpec,
    RunConfig,
    config_from_dict,
    dump_config,
)
from fewshot.distill.task import objective_factory
from fewshot.errors import ConfigError, FewshotError
from fewshot.io import atomic_write_json
from fewshot.io import redact_url as redact
from fewshot.training.data import RunData, load_run_data
from fewshot.training.loop import train
from fewshot.workflows.study import open_study, storage_url, study_dir, tune_section
from fewshot.workflows.tune_outputs import (
    param_importances,
    plot_history,
    plot_importance,
    trial_rows,
    write_csv,
)


@dataclass(frozen=True)
class TuneResult:
    study_dir: Path
    study_name: str
    storage: str  # the storage URL, password hidden
    best_value: float | None  # best validation accuracy; None when no trial completed
    best_params: dict[str, Any]
    best_config: Path | None
    counts: dict[str, int]  # trial state -> number of trials in the study
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- config and space


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    """Set dotted `path` in nested `data` to `value` as is (no text round trip: 5e-05 stays a float)."""
    *parents, last = path.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"tune.space[{path!r}]: {part!r} is not a section; fix the path")
        node = child
    node[last] = value


def with_params(config: RunConfig, params: dict[str, Any], **top: Any) -> RunConfig:
    """`config` with the dotted-path `params` applied (and top-level fields such as name replaced)."""
    data = config.to_dict()
    for path, value in params.items():
        _set(data, path, value)
    return config_from_dict({**data, **top}, f"<{config.name} with {params}>")


def _bounds(spec: ParamSpec) -> list[Any]:
    if spec.type == "categorical":
        return list(spec.choices or [])
    low, high = float(spec.low or 0), float(spec.high or 0)  # both set: ParamSpec checks it
    return [int(low), int(high)] if spec.type == "int" else [low, high]


def check_space(config: RunConfig) -> None:
    """Every bound and choice of the space gives a valid config (checked before any trial runs)."""
    for path, spec in tune_section(config).space.items():
        for value in _bounds(spec):
            try:
                with_params(config, {path: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.space[{path!r}]: the value {value!r} gives an invalid config; fix its "
                                  f"low / high / choices (or the path).\n{exc}") from None


def suggest(trial: Any, space: dict[str, ParamSpec]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for path, spec in space.items():
        if spec.type == "categorical":
            params[path] = trial.suggest_categorical(path, spec.choices)
        elif spec.type == "int":
            step = int(spec.step) if spec.step is not None else 1
            params[path] = trial.suggest_int(path, int(spec.low or 0), int(spec.high or 0), step=step, log=spec.log)
        else:
            params[path] = trial.suggest_float(path, float(spec.low or 0), float(spec.high or 0), step=spec.step,
                                               log=spec.log)
    return params


# --------------------------------------------------------------------------- trials


def trial_config(config: RunConfig, params: dict[str, Any], number: int, out: Path) -> RunConfig:
    return with_params(config, params, name=f"trial-{number:04d}", output_dir=str(out), tune=None)


def _reporter(trial: Any, last_step: int) -> Callable[[int, dict[str, float]], None]:
    """Report validation accuracy; prune before `last_step` (a trial at its last step is complete)."""
    import optuna

    def on_step(step: int, metrics: dict[str, float]) -> None:
        val = metrics.get("val_acc")
        if val is None or not math.isfinite(val):
            return
        trial.report(val, step)
        if step < last_step and trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {val:.4f} at step {step} is below the median")

    return on_step


def run_trial(cfg: RunConfig, data: RunData, on_step: Callable[[int, dict[str, float]], None]) -> float:
    """Train one trial's config; its best validation accuracy."""
    if cfg.distill is not None:

        result = train(cfg, data=data, progress=False, resume=False, on_step=on_step,
                       objective_factory=objective_factory(cfg, data))
    else:
        result = train(cfg, data=data, progress=False, resume=False, on_step=on_step)
    return float(result.best_val_acc)


def objective(config: RunConfig, data: RunData, out: Path) -> Callable[[Any], float]:
    space = tune_section(config).space

    def run(trial: Any) -> float:
        cfg = trial_config(config, suggest(trial, space), trial.number, out)
        trial_data = data if cfg.data == config.data else load_run_data(cfg.data, progress=False)
        value = run_trial(cfg, trial_data, _reporter(trial, cfg.train.steps))
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"trial {trial.number} recorded no validation accuracy (got {value}); "
                              "check train.val_every <= train.steps")
        return value

    return run


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def progress_line(study: Any, trial: Any) -> str:
    state = trial.state.name.lower()
    value = "-" if trial.value is None else f"{100 * trial.value:.2f}%"
    if state == "pruned" and trial.last_step is not None:  # its value: the last one it reported
        value = f"{value} at step {trial.last_step}"
    try:
        best = f"best so far {100 * study.best_value:.2f}% (trial {study.best_trial.number})"
    except ValueError:
        best = "no completed trial yet"
    secs = trial.duration.total_seconds() if trial.duration is not None else float("nan")
    return f"trial {trial.number:4d} {state:8s} {value:>22s} in {secs:6.1f} s  [{_fmt_params(trial.params)}]  {best}"


def _require_val(data: RunData, config: RunConfig) -> None:
    if "val" not in data.splits:
        raise ConfigError(
            f"split scheme {data.scheme!r} of config {config.name!r} has no validation split (splits: "
            f"{sorted(data.splits)}); trials are scored on validation classes only, never on test classes: use a "
            "scheme with a val split (vinyals, domains, classes, lake with data.lake_val_fraction > 0 or "
            "data.lake_val_alphabets > 0, or csv with a val.csv)")


# --------------------------------------------------------------------------- the study


def tune(config: RunConfig, *, trials: int, storage: str | None = None, study_name: str | None = None,
         timeout: float | None = None, data: RunData | None = None, progress: bool = True,
         echo: Callable[[str], None] = print) -> TuneResult:
    """Run `trials` more trials of `config`'s study (created, or joined), then write its outputs."""
    if trials < 1:
        raise ConfigError(f"--trials {trials}: run at least 1 trial")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout {timeout}: give a positive number of seconds, or leave it out")
    check_space(config)
    out = study_dir(config, study_name)
    url = storage_url(storage, out)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(config, url, study_name or config.name)
    data = data or load_run_data(config.data, progress=progress)
    _require_val(data, config)
    echo(f"study {study.study_name!r} in {redact(url)}: {len(study.trials)} trials so far; running {trials} more")
    try:  # a trial that fails (a bad sampled combination, out of memory) is recorded as failed; the study goes on
        study.optimize(objective(config, data, out), n_trials=trials, timeout=timeout,
                       catch=(FewshotError, MemoryError), callbacks=[lambda s, t: echo(progress_line(s, t))], gc_after_trial=True)
    finally:
        result = write_outputs(config, study, out, redact(url), echo)
    return result


def write_outputs(config: RunConfig, study: Any, out: Path, shown_url: str,
                  echo: Callable[[str], None] = print) -> TuneResult:
    """best_config.yaml, trials.csv / trials.json and the plots of the study so far."""
    rows = trial_rows(study)
    files = {"trials_csv": write_csv(rows, out / "trials.csv"), "history": plot_history(rows, out / "history.png")}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    best_value, best_params, best_cfg = None, {}, None
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        best_value, best_params = float(best.value), dict(best.params)
        best_cfg = out / "best_config.yaml"
        dump_config(with_params(config, best_params, name=f"{config.name}-tuned", tune=None), best_cfg)
        files["best_config"] = best_cfg
    notes: list[str] = []
    importances = param_importances(study, notes)
    if importances:
        files["importance"] = plot_importance(importances, out / "importance.png")
    summary = {"study": study.study_name, "storage": shown_url, "metric": "val_acc (best over validation steps)",
               "best_trial": study.best_trial.number if complete else None, "best_value": best_value,
               "best_params": best_params, "importances": importances, "counts": counts, "notes": notes,
               "trials": rows}
    files["trials_json"] = out / "trials.json"
    atomic_write_json(files["trials_json"], summary)
    for note in notes:
        echo(f"note: {note}")
    return TuneResult(out, study.study_name, shown_url, best_value, best_params, best_cfg, counts, files, notes)


