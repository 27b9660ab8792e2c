"""The learner families the distributed-equality test trains, shared by the test (one process)
and tests/training/ddp_worker.py (each torchrun rank)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from synthetic_runs import config

from fewshot.config import RunConfig

# name -> (learner, learner_args, extra train fields); every episodic case has a meta-batch of 4.
# Plain SGD: Adam divides by the gradient's running RMS, which turns float noise in a near-zero
# gradient into a step of size lr, so it would hide (or fake) a difference between the runs.
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "protonet": ("protonet", {}, {}),
    "maml-fast": ("maml", {}, {}),  # one inner step: the batched closed-form fast path
    "maml-2step": ("maml", {"inner_steps": 2}, {}),  # per-task second-order inner loop
    "anil": ("anil", {}, {}),
    "metasgd": ("metasgd", {}, {}),
    "reptile": ("reptile", {"inner_steps": 2}, {}),
    "pretrain": ("pretrain", {}, {"batch_size": 8}),
    "distill": ("protonet", {}, {}),
}


def case_config(root: Path, case: str, teacher: Path, *, name: str, accumulate: int = 1, steps: int = 4) -> RunConfig:
    learner, args, train = CASES[case]
    extra: dict[str, Any] = {}
    if case == "distill":
        extra["distill"] = {"teachers": [{"path": str(teacher)}], "kd_episode_weight": 1.0, "hint_weight": 0.1,
                            "temperature": 4.0, "baseline": False}
    return config(root, learner, name=name, model={"learner_args": args},
                  extra=extra, steps=steps, meta_batch=4, val_every=2, checkpoint_every=2, accumulate=accumulate,
                  optimizer="sgd", lr=0.1, momentum=0.9, **train)


def final_params(learner: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in learner.named_parameters()}
