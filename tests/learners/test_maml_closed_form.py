"""The batched closed-form one-step MAML update equals the per-task loop exactly (up to float error)."""

from __future__ import annotations

import pytest
import torch
from learner_data import class_bank, make_episode

import fewshot.learners.maml as maml_module
from fewshot.backbones import create_backbone
from fewshot.backbones.norm import GroupedContextNorm
from fewshot.learners import create_learner
from fewshot.training.trainer import Trainer


def grads_after_step(name: str, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, torch.Tensor], float]:
    backbone = create_backbone("conv4", in_channels=1, image_size=28, width=0.25)
    learner = create_learner(name, backbone, inner_lr=0.4)
    if not fast:
        monkeypatch.setattr(type(learner), "_closed_form_ok", lambda self, eps: False)
    g = torch.Generator().manual_seed(1)
    bank = class_bank()
    episodes = [make_episode(bank, g, n_way=3, n_shot=2, n_query=3) for _ in range(4)]
    names = {id(p): k for k, p in learner.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    class Capture(torch.optim.SGD):
        """Records the gradients the learner hands to the optimizer (lr 0 keeps the weights)."""

        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[names[id(p)]] = p.grad.clone()

    metrics = step_with(learner, episodes, Capture(learner.parameters(), lr=0.0))
    return grads, metrics["loss"]


@pytest.mark.parametrize("chunk", [4, 3])  # one pass, or chunks of 3 + 1 tasks
@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd"])
def test_closed_form_matches_loop(name: str, chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    slow, slow_loss = grads_after_step(name, False, monkeypatch)
    monkeypatch.undo()
    monkeypatch.setattr(maml_module, "CPU_CLOSED_FORM_CHUNK", chunk)
    fast, fast_loss = grads_after_step(name, True, monkeypatch)
    assert fast_loss == pytest.approx(slow_loss, rel=1e-5)
    for k, v in fast.items():
        ref = slow.get(k, torch.zeros_like(v))
        assert torch.allclose(v, ref, atol=1e-5, rtol=1e-4), k
    assert any(float(v.abs().sum()) > 0 for k, v in fast.items() if k.startswith("backbone."))


def params_after_step(name: str, fast: bool, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Conv-4 parameters after one SGD step on 4 tasks, by the fast path or the per-task loop.
    (SGD, not Adam: the conv biases before batch norm have an exactly-zero gradient, and Adam's
    normalisation would turn float noise in it into full-size steps.)"""
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=1, image_size=28, width=0.25)
    learner = create_learner(name, backbone, inner_lr=0.4)
    if not fast:
        monkeypatch.setattr(type(learner), "_closed_form_ok", lambda self, eps: False)
    g = torch.Generator().manual_seed(2)
    bank = class_bank()
    episodes = [make_episode(bank, g, n_way=5, n_shot=1, n_query=3) for _ in range(4)]
    step_with(learner, episodes, torch.optim.SGD(learner.parameters(), lr=0.5))
    return {k: v.detach().clone() for k, v in learner.named_parameters()}


@pytest.mark.parametrize("name", ["maml", "fomaml"])
def test_fast_path_and_loop_reach_the_same_parameters(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on CPU: the fast path (channels-last activations, grouped support-statistics batch
    norm) and the plain per-task loop land on the same weights after an optimiser step."""
    start = {k: v.detach().clone() for k, v in create_learner(
        name, (torch.manual_seed(0), create_backbone("conv4", in_channels=1, image_size=28, width=0.25))[1],
        inner_lr=0.4).named_parameters()}
    slow = params_after_step(name, False, monkeypatch)
    monkeypatch.undo()
    layouts: list[bool] = []
    apply = GroupedContextNorm.apply

    def spy(x, *args):  # type: ignore[no-untyped-def]
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return apply(x, *args)

    monkeypatch.setattr(GroupedContextNorm, "apply", spy)
    fast = params_after_step(name, True, monkeypatch)
    assert layouts and all(layouts), "the fast path did not run channels-last through the grouped norm"
    assert fast.keys() == slow.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], atol=2e-5, rtol=1e-4, msg=k)
    moved = [k for k in fast if not torch.equal(fast[k], start[k])]
    assert any(k.startswith("backbone.") and k.endswith("0.weight") for k in moved), moved


def step_with(learner, batch, opt):  # type: ignore[no-untyped-def]
    """One optimiser step by the one trainer."""
    return Trainer(learner, opt).step(batch)
