"""The Optuna study of `fewshot tune`: its storage (a SQLite file, or PostgreSQL that several
workers join), the base config every worker must share, the sampler and the pruner. Optuna is
imported inside the functions that use it (slow to import)."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fewshot.config import RunConfig, TuneConfig, config_from_dict
from fewshot.errors import ConfigError
from fewshot.io import redact_url as redact

PG_DRIVER = "postgresql+psycopg"


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
    elif fingerprint not in (saved, _saved_fingerprint(study.user_attrs.get("base_config_dict"))):
        raise ConfigError(f"study {name!r} was run with another base config (everything but tune.space's values "
                          "must match to compare its trials); use --study NEW_NAME for a new study, or the config "
                          "the study was started with")
    # the seed moves with the study's length: a resumed study or a joining worker does not replay the
    # random startup trials already run
    study.sampler = make_sampler(tc, tc.seed + len(study.trials))
    return study


def base_fingerprint(config: RunConfig) -> str:
    """What a joining worker or a resumed study must share: the config except where runs are written."""
    data = {k: v for k, v in config.to_dict().items() if k not in ("output_dir",)}
    if isinstance(data.get("data"), dict):
        data["data"] = {k: v for k, v in data["data"].items() if k not in ("root", "cache_dir")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _saved_fingerprint(saved: Any) -> str | None:
    """The fingerprint of a study's saved base config as this version reads it: a field added since
    the study was started takes its default, as it does when a run resumes."""

    if not isinstance(saved, dict):
        return None
    try:
        return base_fingerprint(config_from_dict(saved))
    except (ConfigError, ValueError):
        return None


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
