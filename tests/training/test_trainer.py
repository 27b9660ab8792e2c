"""The one trainer: accumulation leaves the gradient unchanged, Reptile's pseudo-gradient is the
Reptile update, clipping bounds the step, and the learner never steps on its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fewshot.backbones import create_backbone
from fewshot.episodes.types import Episode
from fewshot.learners import create_learner
from fewshot.training.trainer import Trainer, split_batch


def episodes(n: int, seed: int = 0, way: int = 3, shot: int = 2, query: int = 3) -> list[Episode]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        protos = torch.rand(way, 1, 28, 28, generator=g)
        sx = protos.repeat_interleave(shot, 0) + 0.3 * torch.rand(way * shot, 1, 28, 28, generator=g)
        qx = protos.repeat_interleave(query, 0) + 0.3 * torch.rand(way * query, 1, 28, 28, generator=g)
        out.append(Episode(sx, torch.arange(way).repeat_interleave(shot), qx, torch.arange(way).repeat_interleave(query),
                           torch.arange(way), torch.zeros(way, dtype=torch.long)))
    return out


def small(name: str, **kw: object) -> torch.nn.Module:
    return create_learner(name, create_backbone("conv4", in_channels=1, image_size=28, width=0.25), **kw)


def grads(trainer: Trainer, batch: list[Episode]) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    names = {id(p): k for k, p in trainer.learner.named_parameters()}
    original = trainer._apply

    def capture() -> None:
        for g in trainer.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    captured[names[id(p)]] = p.grad.clone()
        original()

    trainer._apply = capture  # type: ignore[method-assign]
    trainer.step(batch)
    return captured


def test_accumulation_gives_the_same_gradient() -> None:
    batch = episodes(4)
    one = small("maml")
    two = small("maml")
    g1 = grads(Trainer(one, torch.optim.SGD(one.parameters(), lr=0.0)), batch)
    g2 = grads(Trainer(two, torch.optim.SGD(two.parameters(), lr=0.0), accumulate=2), batch)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=1e-5)
    assert [len(p) for p in split_batch(batch, 3)] == [1, 2, 1]


def manual_reptile_target(learner: torch.nn.Module, batch: list[Episode], lr: float, steps: int) -> dict[str, torch.Tensor]:
    """theta + mean_i(phi_i - theta), phi_i from plain SGD on each task's support + query images
    with a zero head and batch statistics (written here, not with the learner's code)."""
    backbone = learner.backbone
    theta = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    acc = {k: torch.zeros_like(v) for k, v in theta.items()}
    for ep in batch:
        x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
        phi = {k: v.clone() for k, v in theta.items()}
        w = torch.zeros(ep.n_way, backbone.embedding_dim)
        b = torch.zeros(ep.n_way)
        for _ in range(steps):
            leaves = [t.requires_grad_() for t in [*phi.values(), w, b]]
            z = functional_call(backbone, phi, (x,))
            loss = F.cross_entropy(F.linear(z, w, b), y)
            gs = torch.autograd.grad(loss, leaves)
            phi = {k: (v - lr * g).detach() for (k, v), g in zip(phi.items(), gs)}
            w, b = (w - lr * gs[-2]).detach(), (b - lr * gs[-1]).detach()
        for k in acc:
            acc[k] += phi[k] - theta[k]
    return {k: theta[k] + acc[k] / len(batch) for k in theta}


def test_reptile_pseudo_gradient_is_the_reptile_update() -> None:
    learner = small("reptile", inner_lr=0.1, inner_steps=2)
    batch = episodes(3)
    learner.train()
    want = manual_reptile_target(learner, batch, lr=0.1, steps=2)
    Trainer(learner, torch.optim.SGD(learner.backbone.parameters(), lr=1.0)).step(batch)
    for k, p in learner.backbone.named_parameters():
        torch.testing.assert_close(p.detach(), want[k], atol=1e-5, rtol=1e-4)


def test_clipping_bounds_the_step() -> None:
    learner = small("protonet")
    before = [p.detach().clone() for p in learner.parameters()]
    Trainer(learner, torch.optim.SGD(learner.parameters(), lr=1.0), grad_clip=1e-3).step(episodes(2))
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(learner.parameters(), before)))
    assert 0 < float(moved) <= 1e-3 + 1e-7


def test_learners_only_compute_losses() -> None:
    learner = small("protonet")
    before = [p.detach().clone() for p in learner.parameters()]
    out = learner.compute(episodes(2))
    assert {"loss", "task", "acc"} <= set(out.terms) and out.terms["loss"].requires_grad
    assert all(torch.equal(p, b) for p, b in zip(learner.parameters(), before))
    assert all(p.grad is None for p in learner.parameters())
