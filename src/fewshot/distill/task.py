"""`fewshot distill CONFIG`: a student learner trained by the one trainer with distillation terms.

The student is any backbone + learner of the config's `model` section; `distill.teachers` are
frozen runs or bundles (several at once, weighted). `DistillObjective` adds, per teacher t with
weight w_t, the terms of `fewshot.distill.losses` on the student's `LearnerOutput`:

    loss = task_weight * task
         + sum_t w_t * ( kd_episode_weight * KD(student episode logits, teacher episode logits)
                       + kd_class_weight   * KD(student base-class logits, teacher's)
                       + hint_weight       * FitNets hint (learned projector per teacher)
                       + rkd_distance_weight * RKD-D + rkd_angle_weight * RKD-A )

Training, checkpoints, exact resume, metrics and curves are `fewshot.training.loop.train`'s; the
projectors are optimised and checkpointed with the student, and a resume with a changed teacher
is refused. `distill.generations > 1` runs born-again generations (Furlanello et al. 2018; the
recipe of Tian et al. 2020): generation g + 1 is taught by generation g alone. With
`distill.baseline` the same student is also trained alone with the same budget, and the report
(`fewshot.distill.report`) compares teachers, the student alone and every generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fewshot.backbones.init import built_quietly, reset_parameters
from fewshot.config import DistillConfig, RunConfig
from fewshot.config.sections import TeacherConfig
from fewshot.distill.losses import HintLoss, RKDAngle, RKDDistance, SoftLogitKD
from fewshot.distill.report import write_report
from fewshot.distill.teacher import Teacher, load_teachers
from fewshot.errors import ConfigError
from fewshot.learners.base import LearnerOutput, embedding_dim_of
from fewshot.training.data import RunData
from fewshot.training.distributed import World
from fewshot.training.loop import TrainObjective, TrainResult, load_data_once, train

TERMS = ("kd_episode", "kd_class", "hint", "rkd_distance", "rkd_angle")


class DistillObjective(TrainObjective):
    """The student's own loss plus the weighted distillation terms of every teacher."""

    def __init__(self, cfg: DistillConfig, teachers: list[Teacher], student_dim: int, seed: int) -> None:
        super().__init__()
        self.cfg, self.teachers = cfg, teachers
        self.kd_episode = SoftLogitKD(cfg.temperature, "kd_episode")
        self.kd_class = SoftLogitKD(cfg.temperature, "kd_class")
        self.rkd_d, self.rkd_a = RKDDistance(), RKDAngle()
        with built_quietly():
            self.hints = nn.ModuleList([HintLoss(student_dim, t.embedding_dim) for t in teachers])
        reset_parameters(self.hints, torch.Generator().manual_seed(seed))

    def describe(self) -> dict[str, Any]:
        return {"teachers": [{**t.describe(), "weight": c.weight} for t, c in zip(self.teachers, self.cfg.teachers)]}

    def _teacher_terms(self, i: int, out: LearnerOutput) -> dict[str, Tensor]:
        cfg, teacher = self.cfg, self.teachers[i]
        terms: dict[str, Tensor] = {}
        episode_layout = out.images is not None and out.episodes and out.images.shape[0] == sum(
            e.support_x.shape[0] + e.query_x.shape[0] for e in out.episodes)
        zt = teacher.embed(out.images) if out.images is not None else None  # one teacher pass per batch
        if cfg.kd_episode_weight > 0:
            if not out.episode_logits:
                raise ConfigError("this learner gives no episode logits; set distill.kd_episode_weight=0 "
                                  "(KD on episodes needs protonet or the MAML family)")
            t_logits = teacher.episode_logits(out.episodes, zt if episode_layout else None)
            terms["kd_episode"] = torch.stack([self.kd_episode(s, t.to(s.device))["kd_episode"]
                                               for s, t in zip(out.episode_logits, t_logits)]).mean()
        if cfg.kd_class_weight > 0:
            if out.class_logits is None or zt is None:
                raise ConfigError("KD on base-class logits needs a student that trains on batches ('pretrain'); "
                                  "set distill.kd_class_weight=0")
            terms.update(self.kd_class(out.class_logits, teacher.class_head(zt)))
        if cfg.hint_weight > 0 or cfg.rkd_distance_weight > 0 or cfg.rkd_angle_weight > 0:
            if out.embeddings is None or zt is None:
                raise ConfigError("this learner gives no embeddings (Reptile, inner-loop MAML); set hint_weight, "
                                  "rkd_distance_weight and rkd_angle_weight to 0")
            if cfg.hint_weight > 0:
                terms.update(self.hints[i](out.embeddings, zt))
            if cfg.rkd_distance_weight > 0:
                terms.update(self.rkd_d(out.embeddings, zt))
            if cfg.rkd_angle_weight > 0:
                terms.update(self.rkd_a(out.embeddings, zt))
        return terms

    def forward(self, out: LearnerOutput) -> dict[str, Tensor]:
        cfg = self.cfg
        weights = {"kd_episode": cfg.kd_episode_weight, "kd_class": cfg.kd_class_weight, "hint": cfg.hint_weight,
                   "rkd_distance": cfg.rkd_distance_weight, "rkd_angle": cfg.rkd_angle_weight}
        task = out.terms["loss"]
        total = cfg.task_weight * task
        terms: dict[str, Tensor] = {k: v for k, v in out.terms.items() if k != "loss"}
        for i, tc in enumerate(cfg.teachers):
            for name, value in self._teacher_terms(i, out).items():
                total = total + tc.weight * weights[name] * value
                terms[name] = terms.get(name, value.new_zeros(())) + tc.weight * value.detach()
        return {"loss": total, **terms}


def objective_factory(config: RunConfig, data: RunData) -> Any:
    distill = config.distill
    assert distill is not None

    def make(learner: Any) -> DistillObjective:
        teachers = [t.set_precision(learner.precision)
                    for t in load_teachers(distill, data, learner.device)]
        return DistillObjective(distill, teachers, embedding_dim_of(learner.backbone), config.seed + 1)

    return make


def generation_configs(config: RunConfig) -> list[RunConfig]:
    """One config per born-again generation; generation g + 1's teacher is generation g's run."""
    d = config.distill
    if d is None:
        raise ConfigError(f"config {config.name!r} has no distill section; see configs/distill/ for examples")
    if d.generations == 1:
        return [config]
    out, prev = [], None
    for g in range(1, d.generations + 1):
        teachers = d.teachers if prev is None else [TeacherConfig(path=str(prev.run_dir()), weight=1.0)]
        cfg = config.model_copy(update={"name": f"{config.name}-gen{g}",
                                        "distill": d.model_copy(update={"teachers": teachers})})
        cfg = RunConfig.model_validate(cfg.to_dict())  # re-validate the nested update
        out.append(cfg)
        prev = cfg
    return out


def baseline_config(config: RunConfig) -> RunConfig:
    """The same student, data, seed and training budget, without a teacher."""
    return RunConfig.model_validate({**config.to_dict(), "name": f"{config.name}-alone", "distill": None})


def distill(config: RunConfig, *, data: RunData | None = None, progress: bool = True, resume: bool = True,
            report: bool = True, world: World | None = None) -> dict[str, Any]:
    """Train every generation (and the baseline), then write the distillation report. Under
    torchrun every rank calls this with its `world`; rank 0 writes the report."""
    world = world or World()
    data = data or load_data_once(config, progress, world)
    results: dict[str, TrainResult] = {}
    gens = generation_configs(config)
    for cfg in gens:
        results[cfg.name] = train(cfg, data=data, progress=progress, resume=resume,
                                  objective_factory=objective_factory(cfg, data), world=world)
    alone = None
    if config.distill is not None and config.distill.baseline:
        alone = baseline_config(config)
        results[alone.name] = train(alone, data=data, progress=progress, resume=resume, world=world)
    summary: dict[str, Any] = {"runs": {k: str(v.run_dir) for k, v in results.items()}}
    if report and world.is_main:

        summary["report"] = str(write_report(config, gens, alone, data=data, progress=progress))
    return summary
