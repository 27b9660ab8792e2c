"""Meta-training and pre-training: one loop for every learner, with exact resume.

Step `s` consumes episodes `s * meta_batch .. (s + 1) * meta_batch - 1` (or batch `s`) of the run's
seed, so the data stream after a resume is the one an uninterrupted run would have seen; the
optimizer and torch RNG states come back from the checkpoint. On CPU a resumed run reproduces an
uninterrupted one exactly.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewshot.config import RunConfig, TrainConfig, dump_config
from fewshot.episodes.batches import sample_batch
from fewshot.episodes.loader import EpisodeDataset, episode_loader
from fewshot.episodes.materialise import Augment
from fewshot.episodes.sampling import EpisodeSpec
from fewshot.errors import CheckpointError, ConfigError
from fewshot.io import atomic_write_json
from fewshot.training.checkpoint import (
    load_training_state,
    load_weights,
    read_manifest,
    save_checkpoint,
)
from fewshot.training.data import RunData, load_run_data
from fewshot.training.evaluate import evaluate_episodes
from fewshot.training.plots import plot_curves

METRIC_FIELDS = ["step", "loss", "acc", "lr", "elapsed_s", "val_acc", "val_ci95"]
VAL_SEED_OFFSET = 100_003


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    best_val_acc: float
    elapsed_s: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=auto or cpu")
    return dev


def build_learner(config: RunConfig, data: RunData, image_shape: tuple[int, int, int]) -> Any:
    """Backbone + learner from the config; pre-training learners get the number of train classes."""
    from fewshot.backbones import create_backbone
    from fewshot.learners import create_learner, learner_class

    c, h, _ = image_shape
    backbone = create_backbone(config.model.backbone, in_channels=c, image_size=h, **config.model.backbone_args)
    kwargs = dict(config.model.learner_args)
    if learner_class(config.model.learner).data_kind == "batches":
        kwargs.setdefault("num_classes", len(data.pool("train", add_rotations=config.data.train_rotations)))
    return create_learner(config.model.learner, backbone, **kwargs)


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based): warmup, then constant / halving every N / cosine."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "step":
        return cfg.lr * 0.5 ** (step // cfg.step_every)
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return cfg.lr


class MetricsLog:
    """metrics.csv in the run folder; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})


def _model_manifest(learner: Any, config: RunConfig, data: RunData) -> dict[str, Any]:
    return {
        "model": {"backbone": learner.backbone.config, "learner": learner.config},
        "config": config.to_dict(),
        "data": {
            "fingerprint": data.cache.fingerprint,
            "preprocessing": data.cache.preprocessing.to_dict(),
            "split": data.scheme,
            "cache": str(data.cache.path),
        },
    }


# Fields a resume may change: they do not change what the run computes (the data fingerprint is
# checked separately, and the step stream does not depend on them).
RESUMABLE = {
    "data": {"root", "cache_dir"},
    "train": {"steps", "num_workers", "device", "max_seconds", "val_every", "val_episodes", "val_way",
              "val_shot", "val_query", "checkpoint_every"},
}


def _same_config(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ, ignoring the ones a resume may change (RESUMABLE)."""
    diffs = []
    for section in ("data", "model", "train", "seed"):
        a, b = saved.get(section), current.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if k not in RESUMABLE.get(section, set()) and a.get(k) != b.get(k):
                    diffs.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{section}: {a!r} -> {b!r}")
    return diffs


def train(
    config: RunConfig,
    *,
    data: RunData | None = None,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `config` into `config.run_dir()`; resumes from its last checkpoint when one exists."""
    run_dir = config.run_dir()
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    data = data or load_run_data(config.data, progress=progress)
    torch.manual_seed(config.seed)
    device = resolve_device(config.train.device)
    learner = build_learner(config, data, data.cache.image_shape).to(device)
    from fewshot.precision import select_precision

    learner.set_precision(select_precision(device, prefer=config.train.precision))
    optimizer = make_optimizer(learner.parameters(), config.train)

    start, best, elapsed_before = 0, -1.0, 0.0
    last = ckpt_dir / "last"
    if resume and (last / "manifest.json").is_file():
        manifest = read_manifest(last)
        diffs = _same_config(manifest["config"], config.to_dict())
        if diffs:
            raise CheckpointError(
                f"run {run_dir} was trained with a different config ({'; '.join(diffs)}); "
                "use a new run name, or pass --no-resume to start over"
            )
        if manifest["data"]["fingerprint"] != data.cache.fingerprint:
            raise CheckpointError(
                f"run {run_dir} was trained on data {manifest['data']['fingerprint'][:12]}, the cache now "
                f"holds {data.cache.fingerprint[:12]}; use a new run name, or pass --no-resume"
            )
        load_weights(last, learner)
        load_training_state(last, optimizer)
        start, best = int(manifest["step"]), float(manifest.get("metrics", {}).get("best_val_acc", -1.0))
        elapsed_before = float(manifest.get("metrics", {}).get("elapsed_s", 0.0))
    dump_config(config, run_dir / "config.yaml")
    atomic_write_json(run_dir / "train_classes.json", {"split": data.scheme, "classes": data.class_names("train")})
    log = MetricsLog(run_dir / "metrics.csv", start)

    tc = config.train
    train_pool = data.pool("train", add_rotations=config.data.train_rotations)
    aug = Augment(tc.crop_pad, tc.hflip)
    episodes = EpisodeDataset(data.cache, train_pool, EpisodeSpec(tc.way, tc.shot, tc.query), seed=config.seed, mode=tc.domain_mode, aug=aug)
    val_split = "val" if "val" in data.splits else None
    val_pool = data.pool(val_split) if val_split else None
    base = _model_manifest(learner, config, data)

    stream = None
    if tc.num_workers > 0 and learner.data_kind == "episodes":  # same episodes, built in workers
        mb = tc.meta_batch
        stream = iter(episode_loader(episodes, start=start * mb, count=(tc.steps - start) * mb,
                                     num_workers=tc.num_workers))

    def batch_for(step: int) -> Any:
        if learner.data_kind == "batches":
            return sample_batch(data.cache, train_pool, tc.batch_size, config.seed, step, aug)
        if stream is not None:
            return [next(stream) for _ in range(tc.meta_batch)]
        return [episodes[step * tc.meta_batch + j] for j in range(tc.meta_batch)]

    def validate() -> tuple[float, float]:
        if val_pool is None:
            return float("nan"), float("nan")
        res = evaluate_episodes(learner.predict, data.cache, val_pool, EpisodeSpec(tc.val_way, tc.val_shot, tc.val_query),
                                episodes=tc.val_episodes, seed=config.seed + VAL_SEED_OFFSET, device=device,
                                progress=False, enforce_protocol=False)
        return res.mean, res.ci95

    t0 = time.perf_counter()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, desc=config.name, disable=not progress)
    metrics: dict[str, float] = {}
    done = start
    for step in bar:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = learner.train_step(batch_for(step), optimizer)
        done = step + 1
        out_of_time = tc.max_seconds is not None and time.perf_counter() - t0 > tc.max_seconds
        elapsed_total = elapsed_before + time.perf_counter() - t0
        row: dict[str, Any] = {"step": done, "lr": lr, "elapsed_s": round(elapsed_total, 3), **metrics}
        if done % tc.val_every == 0 or done == tc.steps or out_of_time:
            row["val_acc"], row["val_ci95"] = validate()
            if row["val_acc"] == row["val_acc"] and row["val_acc"] > best:
                best = row["val_acc"]
                save_checkpoint(ckpt_dir / "best", model=learner, optimizer=None, step=done,
                                manifest={**base, "metrics": {"val_acc": best, "val_ci95": row["val_ci95"]}})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{row['val_acc']:.3f}")
        log.append(row)
        if done % tc.checkpoint_every == 0 or done == tc.steps or out_of_time:
            save_checkpoint(last, model=learner, optimizer=optimizer, step=done,
                            manifest={**base, "metrics": {"best_val_acc": best, "elapsed_s": elapsed_total, **metrics}})
        if on_step is not None:
            on_step(done, metrics)
        if out_of_time:
            break
    if val_pool is None:  # no validation split: the final model is the one to keep
        save_checkpoint(ckpt_dir / "best", model=learner, optimizer=None, step=done,
                        manifest={**base, "metrics": dict(metrics)})
    elapsed = time.perf_counter() - t0
    plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", title=f"{config.name}: {config.model.learner} / {config.model.backbone}")
    summary = {"steps": done, "best_val_acc": best, "train_seconds_this_session": round(elapsed, 2),
               "train_seconds_total": round(elapsed_before + elapsed, 2),
               "device": str(device), "precision": learner.precision.dtype}
    atomic_write_json(run_dir / "train_summary.json", summary)
    return TrainResult(run_dir, done, best, elapsed)


def check_run_dir(run_dir: Path) -> Path:
    """A run folder made by `fewshot train`, or a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml); pass a folder made by `fewshot train`")
    return run_dir


def load_trained(run_dir: Path, *, tag: str = "best", device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild a trained learner from its run folder (no pickle): returns (learner, manifest)."""
    from fewshot.backbones import backbone_from_config
    from fewshot.learners import learner_from_config

    path = check_run_dir(run_dir) / "checkpoints" / tag
    manifest = read_manifest(path)
    backbone = backbone_from_config(manifest["model"]["backbone"])
    learner = learner_from_config(manifest["model"]["learner"], backbone)
    load_weights(path, learner)
    learner.to(resolve_device(device)).eval()
    return learner, manifest


def train_classes(run_dir: Path) -> set[str]:
    path = Path(run_dir) / "train_classes.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; it is written by `fewshot train`")
    return set(json.loads(path.read_text(encoding="utf-8"))["classes"])
