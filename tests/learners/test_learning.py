"""Every learner learns the synthetic task: held-out loss falls and accuracy rises above chance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewshot.learners import create_learner
from fewshot.learners.base import FewShotLearner
from fewshot.training.trainer import Trainer

# name -> (constructor kwargs, optimizer, lr, steps)
CASES = {
    "protonet": ({}, "adam", 3e-3, 20),
    "maml": ({"inner_steps": 2, "eval_inner_steps": 2}, "adam", 3e-3, 10),
    "fomaml": ({"inner_steps": 2, "eval_inner_steps": 2}, "adam", 3e-3, 15),
    "anil": ({}, "adam", 3e-3, 15),
    "metasgd": ({"eval_inner_steps": 2}, "adam", 3e-3, 10),
    "reptile": ({"inner_steps": 3}, "sgd", 1.0, 12),
    "pretrain": ({"num_classes": 24}, "adam", 3e-3, 20),
}


def evaluate(learner: FewShotLearner, episodes: list) -> tuple[float, float]:
    """Mean query cross-entropy and accuracy of inductive predictions on held-out episodes."""
    losses, accs = [], []
    for ep in episodes:
        logits = learner.predict(ep)
        losses.append(float(F.cross_entropy(logits, ep.query_y)))
        accs.append(float((logits.argmax(-1) == ep.query_y).float().mean()))
    return sum(losses) / len(losses), sum(accs) / len(accs)


def pretrain_batch(
    bank: torch.Tensor, g: torch.Generator, n: int = 48
) -> tuple[torch.Tensor, torch.Tensor]:
    from learner_data import images

    y = torch.randint(0, bank.shape[0], (n,), generator=g)
    return torch.cat([images(bank, c[None], 1, g, 0.5) for c in y]), y


@pytest.mark.parametrize("name", list(CASES))
def test_learner_learns(name, episodes, bank, small_conv4):
    kwargs, opt_name, lr, steps = CASES[name]
    learner = create_learner(name, small_conv4(0), **kwargs)
    opt = (torch.optim.Adam if opt_name == "adam" else torch.optim.SGD)(learner.parameters(), lr=lr)
    held_out = episodes(4, seed=999, n_query=3)
    loss0, acc0 = evaluate(learner, held_out)
    g = torch.Generator().manual_seed(1)
    train = episodes(2 * steps, seed=1, n_query=3)
    for i in range(steps):
        batch = (
            pretrain_batch(bank, g) if learner.data_kind == "batches" else train[2 * i : 2 * i + 2]
        )
        metrics = step_with(learner, batch, opt)
        assert set(metrics) >= {"loss", "acc"} and all(
            isinstance(v, float) for v in metrics.values()
        )
    loss1, acc1 = evaluate(learner, held_out)
    assert loss1 < loss0, f"{name}: held-out loss did not fall ({loss0:.3f} -> {loss1:.3f})"
    assert acc1 > 0.5 and acc1 > acc0, f"{name}: accuracy {acc0:.2f} -> {acc1:.2f} (chance 0.2)"


def step_with(learner, batch, opt):  # type: ignore[no-untyped-def]
    """One optimiser step by the one trainer."""
    return Trainer(learner, opt).step(batch)
