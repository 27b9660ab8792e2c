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

import csv
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewshot.config import (
    ParamSpec,
    RunConfig,
    TuneConfig,
    config_from_dict,
    dump_config,
)
from fewshot.distill.task import objective_factory
from fewshot.errors import ConfigError, FewshotError
from fewshot.io import atomic_write_json, atomic_write_text
from fewshot.io import redact_url as redact
from fewshot.training.data import RunData, load_run_data
from fewshot.training.loop import train

PG_DRIVER = "postgresql+psycopg"


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


def tune_section(config: RunConfig) -> TuneConfig:
    if config.tune is None or not config.tune.space:
        raise ConfigError(
            f"config {config.name!r} has no tune.space to search; add e.g.\n"
            "tune:\n  space:\n    train.lr: {type: float, low: 0.0001, high: 0.01, log: true}\n"
            "    train.way: {type: int, low: 5, high: 30}")
    if config.distill is not None and config.distill.generations > 1:
        raise ConfigError(f"distill.generations is {config.distill.generations}; a trial trains one student "
                          "taught by distill.teachers: set distill.generations=1 to tune it")
    return config.tune


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


# --------------------------------------------------------------------------- storage


def study_dir(config: RunConfig, study_name: str | None = None) -> Path:
    """<output_dir>/<name>-tune for the default study; <output_dir>/<name>-tune-<study> for a named one."""
    default = f"{config.name}-tune"
    return Path(config.output_dir) / (default if study_name in (None, config.name) else f"{default}-{study_name}")


def storage_url(url: str | None, default_dir: Path) -> str:
    """The SQLAlchemy URL of the study storage: SQLite file by default; postgresql:// -> psycopg 3."""
    if url is None:
        return f"sqlite:///{(default_dir / 'study.db').resolve()}"
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return PG_DRIVER + "://" + url[len(prefix):]
    if url.startswith(("sqlite:///", "postgresql+")):
        return url
    raise ConfigError(f"--storage {redact(url)!r} is not a study storage URL; use postgresql://user:PASSWORD@host/db "
                      "or sqlite:///path/study.db (or leave it out: <output_dir>/<name>-tune/study.db)")


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, or a ConfigError naming the URL (without its password)."""
    import optuna

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # heartbeats: a trial whose process died is marked failed when another worker starts
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60, grace_period=180)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for secret in _passwords(url):
            reason = reason.replace(secret, "***")
        raise ConfigError(
            f"cannot open the study storage {redact(url)}: {type(exc).__name__}: {reason}; check that the database "
            "server is running and reachable and the user, password and database name are right, or leave out "
            "--storage to keep the study in a SQLite file") from None


def _passwords(url: str) -> list[str]:
    """The password of `url` as written and percent-decoded, to scrub from driver messages."""
    from urllib.parse import unquote

    _, sep, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0] if sep else ""
    found = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
    found += re.findall(r"(?i)password=([^&]+)", url)
    return sorted({v for p in found for v in (p, unquote(p)) if p}, key=len, reverse=True)


def open_study(config: RunConfig, url: str, name: str) -> Any:
    """Create the study, or join it when it exists (another worker, or an earlier run)."""
    import optuna

    tc = tune_section(config)
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                pruner=make_pruner(tc))
    fingerprint = base_fingerprint(config)
    saved = study.user_attrs.get("base_config")
    if saved is None:
        study.set_user_attr("base_config", fingerprint)
        study.set_user_attr("base_config_dict", config.to_dict())
    elif saved != fingerprint:
        raise ConfigError(f"study {name!r} was run with another base config (everything but tune.space's values "
                          "must match to compare its trials); use --study NEW_NAME for a new study, or the config "
                          "the study was started with")
    # the seed moves with the study's length: a resumed study or a joining worker does not replay the
    # random startup trials already run
    study.sampler = make_sampler(tc, tc.seed + len(study.trials))
    return study


def base_fingerprint(config: RunConfig) -> str:
    """What a joining worker or a resumed study must share: the config except where runs are written."""
    import hashlib

    data = {k: v for k, v in config.to_dict().items() if k not in ("output_dir",)}
    if isinstance(data.get("data"), dict):
        data["data"] = {k: v for k, v in data["data"].items() if k not in ("root", "cache_dir")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def make_sampler(tc: TuneConfig, seed: int) -> Any:
    import optuna

    if tc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tc.startup_trials)


def make_pruner(tc: TuneConfig) -> Any:
    import optuna

    if tc.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=tc.warmup_steps)


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
            "scheme with a val split (vinyals, domains, classes, lake with data.lake_val_fraction > 0, or csv with "
            "a val.csv)")


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


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "last_step": steps[-1] if steps else None,
                     "duration_s": round(t.duration.total_seconds(), 2) if t.duration is not None else None,
                     "params": dict(t.params),
                     "intermediate": {str(s): t.intermediate_values[s] for s in steps}})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    names = sorted({k for r in rows for k in r["params"]})
    head = ["number", "state", "value", "last_step", "duration_s", *names]
    lines = [head] + [[r[k] for k in head[:5]] + [r["params"].get(n, "") for n in names] for r in rows]
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(["" if v is None else v for v in line] for line in lines)
    atomic_write_text(path, buf.getvalue())
    return path


def param_importances(study: Any, notes: list[str]) -> dict[str, float]:
    """PED-ANOVA importances (numpy only), or {} with a note saying why they cannot be computed."""
    import optuna

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    varying = {k for k in {k for t in complete for k in t.params}
               if len({json.dumps(t.params.get(k)) for t in complete}) > 1}
    if len(complete) < 2 or not varying:
        notes.append(f"parameter importance not computed: it needs >= 2 completed trials whose parameters vary "
                     f"(have {len(complete)} completed, {len(varying)} varying parameters); run more trials")
        return {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        notes.append(f"parameter importance not computed ({type(exc).__name__}: {exc}); run more trials")
        return {}
    notes += [f"parameter importance: {w.message} (with {len(complete)} completed trials; run more trials)"
              for w in caught if issubclass(w.category, UserWarning)
              and not issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    return {k: float(v) for k, v in imp.items()}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_history(rows: list[dict[str, Any]], path: Path) -> Path:
    """Each trial's score (pruned: its last reported value, hollow) and the best so far."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    done = [(r["number"], 100 * r["value"]) for r in rows if r["state"] == "complete"]
    pruned = [(r["number"], 100 * r["intermediate"][str(r["last_step"])]) for r in rows
              if r["state"] == "pruned" and r["intermediate"]]
    if done:
        x, y = zip(*done)
        ax.plot(x, y, "o", label="completed trial (best val acc)")
        best, running = [], -math.inf
        for v in y:
            running = max(running, v)
            best.append(running)
        ax.step(x, best, where="post", color="C3", label="best so far")
    if pruned:
        x, y = zip(*pruned)
        ax.plot(x, y, "o", mfc="none", color="C7", label="pruned trial (last val acc)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("optimisation history")
    if done or pruned:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_importance(importances: dict[str, float], path: Path) -> Path:
    fig = _figure(7, 0.6 + 0.45 * len(importances))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    ax.set_title("parameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
