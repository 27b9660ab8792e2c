"""Meta-training and pre-training: one loop for every learner, with exact resume.

Step `s` consumes episodes `s * meta_batch .. (s + 1) * meta_batch - 1` (or batch `s`) of the run's
seed, so the data stream after a resume is the one an uninterrupted run would have seen; the
optimizer state comes back from the checkpoint. On CPU a resumed run reproduces an uninterrupted
one exactly.

Under torchrun (`world.size > 1`, see `fewshot.training.distributed`) rank r takes its contiguous
slice of each step's meta-batch (or batch), so `train.steps` is the same global work and the same
episodes whatever the number of processes, and a run resumes with another number of processes.
Only rank 0 validates and writes the run folder (checkpoints, metrics, plots).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fewshot.backbones import create_backbone
from fewshot.backbones.init import built_quietly, reset_parameters
from fewshot.config import RunConfig, TrainConfig, dump_config
from fewshot.episodes.batches import sample_batch
from fewshot.episodes.loader import EpisodeDataset, episode_loader
from fewshot.episodes.materialise import Augment
from fewshot.episodes.sampling import EpisodeSpec
from fewshot.errors import CheckpointError, ConfigError
from fewshot.io import atomic_write_json
from fewshot.learners import create_learner, learner_class
from fewshot.precision import select_precision
from fewshot.training.checkpoint import (
    load_training_state,
    load_weights,
    read_manifest,
    save_checkpoint,
)
from fewshot.training.data import RunData, load_run_data
from fewshot.training.distributed import DistributedError, World, any_rank, barrier, is_comm_failure
from fewshot.training.evaluate import evaluate_episodes
from fewshot.training.metrics_log import MetricsLog
from fewshot.training.plots import plot_curves
from fewshot.training.resume import config_differences
from fewshot.training.runs import resolve_device
from fewshot.training.segments import SegmentLog
from fewshot.training.trainer import Trainer

OBJECTIVE_WEIGHTS = "objective.safetensors"

VAL_SEED_OFFSET = 100_003


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    best_val_acc: float  # rank 0's (the rank that validates) under torchrun; -1 on the others
    elapsed_s: float
    learner: Any = field(default=None, repr=False, compare=False)  # this process's trained learner (last step)


def build_learner(config: RunConfig, data: RunData, image_shape: tuple[int, int, int]) -> Any:
    """Backbone + learner from the config, initialised from a generator seeded with `config.seed`
    (the global RNG is never seeded); pre-training learners get the number of train classes."""
    c, h, _ = image_shape
    gen = torch.Generator().manual_seed(config.seed)
    backbone = create_backbone(config.model.backbone, in_channels=c, image_size=h, generator=gen,
                               **config.model.backbone_args)
    kwargs = dict(config.model.learner_args)
    if learner_class(config.model.learner).data_kind == "batches":
        kwargs.setdefault("num_classes", len(data.pool("train", add_rotations=config.data.train_rotations)))
    with built_quietly():
        learner = create_learner(config.model.learner, backbone, **kwargs)
    for name, child in learner.named_children():  # the learner's own layers (e.g. a classifier)
        if name != "backbone":
            reset_parameters(child, gen)
    return learner


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


class TrainObjective(torch.nn.Module):
    """What `train` needs from a distillation objective: terms on top of the learner's, its own
    learnable parameters (projectors; optimised and checkpointed with the learner), and a
    description that a resume must match (the teachers' identities)."""

    def forward(self, out: Any) -> dict[str, torch.Tensor]:  # LearnerOutput -> terms
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {}


@dataclass
class _Session:
    """Everything a training run holds while it runs."""
    config: RunConfig
    data: RunData
    device: torch.device
    learner: Any
    trainer: Trainer
    objective: TrainObjective | None
    base_manifest: dict[str, Any]
    world: World = World()
    start: int = 0
    best: float = -1.0
    elapsed_before: float = 0.0
    segments: SegmentLog | None = None  # rank 0's record of this run's stretches of work

    @property
    def ckpt_dir(self) -> Path:
        return self.config.run_dir() / "checkpoints"


def _setup(config: RunConfig, data: RunData, objective_factory: Callable[[Any], TrainObjective] | None,
           world: World) -> _Session:
    tc = config.train
    if learner_data_kind(config) == "batches":  # refused before the model is built
        world.split(tc.batch_size, "train.batch_size")
    else:
        world.split(tc.meta_batch, "train.meta_batch")
    device = world.device_for(resolve_device(tc.device))
    learner = build_learner(config, data, data.cache.image_shape).to(device)

    learner.set_precision(select_precision(device, prefer=config.train.precision))
    objective = objective_factory(learner).to(device) if objective_factory is not None else None
    params = list(learner.parameters()) + (list(objective.parameters()) if objective is not None else [])
    optimizer = make_optimizer(params, config.train)
    trainer = Trainer(learner, optimizer, objective=objective, accumulate=config.train.accumulate,
                      grad_clip=config.train.grad_clip, world=world)
    base = _model_manifest(learner, config, data)
    if objective is not None:
        base["objective"] = objective.describe()
    return _Session(config, data, device, learner, trainer, objective, base, world)


def learner_data_kind(config: RunConfig) -> str:
    return str(learner_class(config.model.learner).data_kind)


def _restore(s: _Session) -> None:
    """Continue from the last checkpoint, refusing a changed config, data or teacher."""
    last = s.ckpt_dir / "last"
    if not (last / "manifest.json").is_file():
        return
    run_dir, manifest = s.config.run_dir(), read_manifest(last)
    # the saved config re-validated: fields added since it was written take their defaults
    diffs = config_differences(RunConfig.model_validate(manifest["config"]).to_dict(), s.config.to_dict())
    if diffs:
        raise CheckpointError(f"run {run_dir} was trained with a different config ({'; '.join(diffs)}); "
                              "use a new run name, or pass --no-resume to start over")
    if manifest["data"]["fingerprint"] != s.data.cache.fingerprint:
        raise CheckpointError(
            f"run {run_dir} was trained on data {manifest['data']['fingerprint'][:12]}, the cache now "
            f"holds {s.data.cache.fingerprint[:12]}; use a new run name, or pass --no-resume")
    if manifest.get("objective") != s.base_manifest.get("objective"):
        raise CheckpointError(
            f"run {run_dir} was distilled from {manifest.get('objective')}, now {s.base_manifest.get('objective')}: "
            "the teacher changed. Resume with the original teacher, or use a new run name / --no-resume")
    load_weights(last, s.learner)
    if s.objective is not None:
        load_weights(last, s.objective, name=OBJECTIVE_WEIGHTS)
    load_training_state(last, s.trainer.optimizer)
    metrics = manifest.get("metrics", {})
    s.start, s.best = int(manifest["step"]), float(metrics.get("best_val_acc", -1.0))
    s.elapsed_before = float(metrics.get("elapsed_s", 0.0))


def _batches(s: _Session) -> Callable[[int], Any]:
    """step -> its batch: episodes `step * meta_batch ...` (or batch `step`) of the run's seed;
    under torchrun, this rank's contiguous slice of them."""
    config, data, tc, world = s.config, s.data, s.config.train, s.world
    pool = data.pool("train", add_rotations=config.data.train_rotations)
    aug = Augment(tc.crop_pad, tc.hflip, rrc_scale=tc.rrc_scale, rrc_ratio=tc.rrc_ratio,
                  color_jitter=tc.color_jitter, hue_jitter=tc.hue_jitter, affine=tc.affine)
    if s.learner.data_kind == "batches":
        per = world.split(tc.batch_size, "train.batch_size")
        lo = world.rank * per

        def slice_of(step: int) -> Any:  # the global batch `step` (of which this rank trains its slice)
            x, y = sample_batch(data.cache, pool, tc.batch_size, config.seed, step, aug)
            return x[lo:lo + per], y[lo:lo + per]

        return slice_of
    episodes = EpisodeDataset(data.cache, pool, EpisodeSpec(tc.way, tc.shot, tc.query), seed=config.seed,
                              mode=tc.domain_mode, aug=aug)
    if tc.domain_mode == "within":
        small = pool.domains_too_small(tc.way, tc.shot + tc.query)
        if small and world.rank == 0:
            listed = ", ".join(f"{name} ({n})" for name, n in sorted(small.items()))
            warnings.warn(f"within-domain {tc.way}-way training episodes never draw from the {len(small)} "
                          f"domains with fewer than {tc.way} training classes of {tc.shot + tc.query}+ images: "
                          f"{listed}; "
                          "lower train.way to train on them", stacklevel=2)
    mb = tc.meta_batch
    per = world.split(mb, "train.meta_batch")
    first = world.rank * per

    def indices(step: int) -> list[int]:
        return [step * mb + first + j for j in range(per)]

    if tc.num_workers > 0:  # the same episodes, built in worker processes
        stream = iter(episode_loader(episodes, indices=[i for st in range(s.start, tc.steps) for i in indices(st)],
                                     num_workers=tc.num_workers))
        return lambda step: [next(stream) for _ in range(per)]
    return lambda step: [episodes[i] for i in indices(step)]


def _validate(s: _Session) -> tuple[float, float]:
    if "val" not in s.data.splits:
        return float("nan"), float("nan")
    tc = s.config.train
    res = evaluate_episodes(s.learner.predict, s.data.cache, s.data.pool("val"),
                            EpisodeSpec(tc.val_way, tc.val_shot, tc.val_query), episodes=tc.val_episodes,
                            seed=s.config.seed + VAL_SEED_OFFSET, mode=tc.val_domain_mode, device=s.device, progress=False,
                            enforce_protocol=False)
    return res.mean, res.ci95


def _save(s: _Session, tag: str, step: int, metrics: dict[str, Any], with_optimizer: bool) -> None:
    save_checkpoint(s.ckpt_dir / tag, model=s.learner, optimizer=s.trainer.optimizer if with_optimizer else None,
                    step=step, manifest={**s.base_manifest, "metrics": metrics},
                    extra={OBJECTIVE_WEIGHTS: s.objective} if s.objective is not None else None)


@contextmanager
def _group_guard(s: _Session, step: int) -> Iterator[None]:
    """Under torchrun, a lost peer or a broken group becomes an error naming the checkpoint on disk
    and the command that resumes; any other error passes through unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if not (s.world.distributed and is_comm_failure(exc)):
            raise
        last = s.ckpt_dir / "last"
        saved = (f"the last checkpoint (step {read_manifest(last)['step']}) in {last} is intact"
                 if (last / "manifest.json").is_file() else "no checkpoint was written yet")
        raise DistributedError(
            f"rank {s.world.rank} of {s.world.size} lost the other processes at step {step} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {saved}: rerun the same "
            "torchrun command to resume (with any --nproc-per-node that divides the meta-batch)") from exc


def _run_steps(s: _Session, progress: bool, on_step: Callable[[int, dict[str, float]], None] | None) -> tuple[int, dict[str, float]]:
    tc, main = s.config.train, s.world.is_main
    batch_for = _batches(s)
    t0 = time.perf_counter()
    log = MetricsLog(s.config.run_dir() / "metrics.csv", s.start) if main else None
    bar = tqdm(range(s.start, tc.steps), initial=s.start, total=tc.steps, desc=s.config.name,
               disable=not (progress and main))
    metrics: dict[str, float] = {}
    done = s.start
    segment_start = s.elapsed_before
    for step in bar:
        lr = lr_at(step, tc)
        done = step + 1
        with _group_guard(s, done):
            metrics = s.trainer.step(batch_for(step), lr)
            out_of_time = any_rank(tc.max_seconds is not None and time.perf_counter() - t0 > tc.max_seconds,
                                   s.world, s.device)
        elapsed = s.elapsed_before + time.perf_counter() - t0
        row: dict[str, Any] = {"step": done, "lr": lr, "elapsed_s": round(elapsed, 3), **metrics}
        if main and (done % tc.val_every == 0 or done == tc.steps or out_of_time):
            row["val_acc"], row["val_ci95"] = _validate(s)
            if row["val_acc"] == row["val_acc"] and row["val_acc"] > s.best:
                s.best = row["val_acc"]
                _save(s, "best", done, {"val_acc": s.best, "val_ci95": row["val_ci95"]}, with_optimizer=False)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", val=f"{row['val_acc']:.3f}")
        if log is not None:
            log.append(row)
        if main and (done % tc.checkpoint_every == 0 or done == tc.steps or out_of_time):
            _save(s, "last", done, {"best_val_acc": s.best, "elapsed_s": elapsed, **metrics}, with_optimizer=True)
            if s.segments is not None:
                s.segments.update(done, elapsed - segment_start)
        if on_step is not None:  # the step's terms, plus val_acc / val_ci95 on validation steps
            on_step(done, {**metrics, **{k: row[k] for k in ("val_acc", "val_ci95") if k in row}})
        if out_of_time:
            break
    s.elapsed_before += time.perf_counter() - t0
    return done, metrics


def train(
    config: RunConfig,
    *,
    data: RunData | None = None,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    objective_factory: Callable[[Any], TrainObjective] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train `config` into `config.run_dir()`; resumes from its last checkpoint when one exists.

    `objective_factory(learner)` adds terms to the learner's loss (distillation: see
    `fewshot.distill.distill`, which is how a config with a `distill` section is run). `world`:
    this process's rank in a torchrun launch whose process group is joined
    (`fewshot.training.distributed.process_group`); every rank calls `train` with the same config."""
    world = world or World()
    if config.distill is not None and objective_factory is None:
        raise ConfigError(f"config {config.name!r} has a distill section; run it with `fewshot distill CONFIG`")
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    data = data or load_data_once(config, progress, world)
    s = _setup(config, data, objective_factory, world)
    if resume:
        _restore(s)
    before = s.elapsed_before
    if world.is_main:
        dump_config(config, run_dir / "config.yaml")
        atomic_write_json(run_dir / "train_classes.json", {"split": data.scheme, "classes": data.class_names("train")})
        s.segments = SegmentLog.open(run_dir, s.start, device=str(s.device), precision=s.learner.precision.dtype,
                                     world_size=world.size)
    done, metrics = _run_steps(s, progress, on_step)
    session = s.elapsed_before - before
    if world.is_main:
        _finish(s, done, metrics, session)
    with _group_guard(s, done):
        barrier(world)  # every rank returns once the run folder is complete
    return TrainResult(run_dir, done, s.best, session, s.learner)


def load_data_once(config: RunConfig, progress: bool, world: World) -> RunData:
    """The run's data; under torchrun rank 0 prepares the cache (when it is missing or stale)
    while the others wait, then they open it: one build, no race on the cache folder."""
    first = load_run_data(config.data, progress=progress) if world.is_main else None
    barrier(world)
    return first if first is not None else load_run_data(config.data, progress=False)


def _finish(s: _Session, done: int, metrics: dict[str, float], session: float) -> None:
    config, run_dir = s.config, s.config.run_dir()
    if "val" not in s.data.splits:  # no validation split: the final model is the one to keep
        _save(s, "best", done, dict(metrics), with_optimizer=False)
    plot_curves(run_dir / "metrics.csv", run_dir / "curves.png",
                title=f"{config.name}: {config.model.learner} / {config.model.backbone}")
    atomic_write_json(run_dir / "train_summary.json", {
        "steps": done, "best_val_acc": s.best, "train_seconds_this_session": round(session, 2),
        "train_seconds_total": round(s.elapsed_before, 2), "device": str(s.device),
        "precision": s.learner.precision.dtype, "torch": torch.__version__, "world_size": s.world.size})


