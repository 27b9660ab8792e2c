"""The one trainer: learners compute losses, the trainer steps.

`Trainer.step(batch, lr)` splits the batch into micro-batches (the learner's own split, within
`accumulate` parts), runs `learner.compute` on each, lets an optional objective (distillation)
add its terms, backpropagates `terms["loss"]` weighted by the micro-batch's share of the batch
(loss-scaled under fp16), clips the global gradient norm, and steps the optimiser. Reptile's outer
update arrives as a pseudo-gradient like any other loss (see `fewshot.learners.reptile`).

Distributed (`world.size > 1`): the learner and the objective are wrapped together in
`DistributedDataParallel`, which averages their gradients across ranks during the last
micro-batch's backward (the others run under `no_sync`); each rank's batch is its slice of the
global one, so the averaged gradient is the global batch's and every rank applies the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from fewshot.episodes.types import Episode
from fewshot.errors import ConfigError
from fewshot.learners.base import Batch, FewShotLearner, LearnerOutput
from fewshot.training.distributed import World, all_mean

Objective = Callable[[LearnerOutput], dict[str, Tensor]]


def batch_size(batch: Batch) -> int:
    """Tasks in a meta-batch, or images in an (x, y) batch."""
    if isinstance(batch, Episode):
        return 1
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], Tensor):
        return int(batch[0].shape[0])
    return len(batch)


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`batch` in at most `parts` contiguous pieces of near-equal size (accumulation)."""
    n = batch_size(batch)
    if parts <= 1 or n <= 1:
        return [batch]
    bounds = [round(i * n / parts) for i in range(min(parts, n) + 1)]
    if isinstance(batch, tuple):
        x, y = batch
        return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    if not isinstance(batch, list):  # an Episode has size 1 and returned above
        raise TypeError(f"cannot split a {type(batch).__name__} batch")
    return [batch[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


class _Terms(torch.nn.Module):
    """Learner + objective as one module whose forward is the training terms (what DDP wraps)."""

    def __init__(self, learner: FewShotLearner, objective: Objective | None) -> None:
        super().__init__()
        self.learner = learner
        self.objective = objective  # registered as a submodule when it is one (its projectors train)

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        out = self.learner.compute(batch)
        return self.objective(out) if self.objective is not None else out.terms


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> Any:
    """DistributedDataParallel over `module` (its parameters broadcast from rank 0 on entry). It
    searches each step's graph for parameters the step leaves unused (Meta-SGD's body learning
    rates on the closed-form path, a backbone's spare classifier, an idle projector), which DDP
    would otherwise wait for forever; the search costs one graph traversal per step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


class Trainer:
    """Backward, precision (loss scaling), accumulation, clipping and the optimiser step."""

    def __init__(
        self,
        learner: FewShotLearner,
        optimizer: torch.optim.Optimizer,
        *,
        objective: Objective | None = None,
        accumulate: int = 1,
        grad_clip: float | None = None,
        world: World | None = None,
    ) -> None:
        if accumulate < 1:
            raise ConfigError(f"accumulate must be >= 1; got {accumulate}")
        if grad_clip is not None and grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0 or None; got {grad_clip}")
        self.learner, self.optimizer, self.objective = learner, optimizer, objective
        self.accumulate, self.grad_clip = accumulate, grad_clip
        self.world = world or World()
        terms = _Terms(learner, objective)
        self.ddp = wrap_ddp(terms, learner.device) if self.world.distributed else None
        self._forward = self.ddp if self.ddp is not None else terms
        policy = learner.precision
        self.scaler = torch.amp.GradScaler(policy.device_type) if policy.needs_grad_scaler else None

    def micro_batches(self, batch: Batch) -> list[Batch]:
        return [mb for part in split_batch(batch, self.accumulate) for mb in self.learner.micro_batches(part)]

    def terms(self, batch: Batch) -> dict[str, Tensor]:
        """The learner's terms, plus the objective's when there is one (through DDP when distributed)."""
        return dict(self._forward(batch))

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _apply(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def step(self, batch: Batch, lr: float | None = None) -> dict[str, float]:
        """One optimiser step on `batch` (this rank's slice when distributed); returns the global
        batch's mean of every term."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = batch_size(batch)
        sums: dict[str, float] = {}
        mbs = self.micro_batches(batch)
        for i, mb in enumerate(mbs):
            share = batch_size(mb) / total
            # DDP averages gradients once, in the last micro-batch's backward
            sync = self.ddp.no_sync() if self.ddp is not None and i < len(mbs) - 1 else nullcontext()
            with sync:
                terms = self.terms(mb)
                if "loss" not in terms:
                    raise ConfigError(f"{type(self.learner).__name__}.compute returned no 'loss' term: {sorted(terms)}")
                self._backward(terms["loss"] * share)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * share
        self._apply()
        self.optimizer.zero_grad(set_to_none=True)
        return all_mean(sums, self.world, self.learner.device)
