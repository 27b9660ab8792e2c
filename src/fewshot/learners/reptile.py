"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999).

For each task of the meta-batch: copy the weights, take `inner_steps` SGD steps on all of the
task's labelled images (support + query), and record the displacement theta - phi_i. The outer
update moves theta toward the adapted weights. It fits the one trainer as a pseudo-gradient:
`compute` returns the surrogate loss sum_k <theta_k, stopgrad(mean_i(theta_k - phi_i,k))>, whose
gradient is exactly the mean displacement, so the trainer's backward / loss scaling / clipping /
optimiser step apply unchanged: SGD(lr=epsilon) is theta <- theta + epsilon * mean(phi_i - theta),
and Adam gives the common "Reptile with Adam" variant. "task" / "acc" are the last inner step's.

Head and batch norm as in the MAML family (zero head per task; MetaBN, inductive predictions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.learners.base import Batch, LearnerOutput, as_meta_batch
from fewshot.learners.maml import GradientLearner, InnerLoopChecks, Params


@dataclass(frozen=True)
class ReptileConfig(InnerLoopChecks):
    inner_lr: float = 0.1
    inner_steps: int = 5
    eval_inner_steps: int = 10
    transductive: bool = False

    @property
    def first_order(self) -> bool:  # Reptile is first-order by construction
        return True


class Reptile(GradientLearner):
    name = "reptile"
    Config = ReptileConfig

    def _sgd(
        self, params: Params, x: Tensor, y: Tensor, steps: int
    ) -> tuple[Params, Tensor, Tensor]:
        """`steps` plain SGD steps without a graph; returns weights, last loss and last logits."""
        loss = logits = torch.zeros(())
        for _ in range(steps):
            params = {k: v.detach().requires_grad_() for k, v in params.items()}
            with self.autocast():
                logits = self.logits(params, x, x.shape[0])
            loss = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {
                k: v.detach() - self.cfg.inner_lr * g for (k, v), g in zip(params.items(), grads)
            }
        return params, loss.detach(), logits.detach()

    def compute(self, batch: Batch) -> LearnerOutput:
        """The Reptile pseudo-gradient of a meta-batch as a surrogate loss (see the module doc)."""
        episodes = as_meta_batch(batch)
        self.train()
        theta = {k: p.detach() for k, p in self.body_params().items()}
        delta = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in theta.items()}
        losses, accs = [], []
        for ep in episodes:
            x = self.prep(torch.cat([ep.support_x, ep.query_x]))
            y = torch.cat([ep.support_y, ep.query_y]).to(self.device)
            phi, loss, logits = self._sgd(
                {**theta, **self.zero_head(ep.n_way, x)}, x, y, self.cfg.inner_steps
            )
            for k in delta:
                delta[k] += (theta[k] - phi[k]).float()
            losses.append(loss)
            accs.append((logits.argmax(-1) == y).float().mean())
        surrogate = torch.stack([
            (p.float() * (delta[k] / len(episodes))).sum() for k, p in self.body_params().items()
        ]).sum()
        task = torch.stack(losses).mean()
        return LearnerOutput({"loss": surrogate, "task": task, "acc": torch.stack(accs).mean()},
                             episodes=episodes)

    def _fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Reptile:
        xs, ys = self.prep(support_x), support_y.to(self.device)
        with torch.enable_grad():
            params = {k: p.detach() for k, p in self.body_params().items()}
            phi, _, _ = self._sgd(
                {**params, **self.zero_head(n_way, xs)}, xs, ys, self.cfg.eval_inner_steps
            )
        self._fitted = (phi, xs)
        return self
