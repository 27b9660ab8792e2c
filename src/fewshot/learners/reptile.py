"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms",
arXiv:1803.02999).

For each task of the meta-batch: copy the weights, take `inner_steps` SGD steps on all of the
task's labelled images (support + query), and record the displacement theta - phi_i. The outer
update moves theta toward the adapted weights: the mean displacement is written into `.grad` and
the caller's optimizer steps, so SGD(lr=epsilon) is exactly theta <- theta + epsilon * mean(phi_i -
theta) and Adam gives the common "Reptile with Adam" variant.

Head and batch norm as in the MAML family (zero head per task; MetaBN, inductive predictions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError
from fewshot.learners.base import Batch, accuracy, as_meta_batch
from fewshot.learners.maml import GradientLearner, Params


@dataclass(frozen=True)
class ReptileConfig:
    inner_lr: float = 0.1
    inner_steps: int = 5
    eval_inner_steps: int = 10
    transductive: bool = False

    def __post_init__(self) -> None:
        if self.inner_lr <= 0:
            raise ConfigError(f"inner_lr must be > 0; got {self.inner_lr}")
        if self.inner_steps < 1 or self.eval_inner_steps < 1:
            raise ConfigError(
                f"inner_steps and eval_inner_steps must be >= 1; got {self.inner_steps}, {self.eval_inner_steps}"
            )

    @property
    def first_order(self) -> bool:  # Reptile is first-order by construction
        return True


class Reptile(GradientLearner):
    name = "reptile"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int = 10,
        transductive: bool = False,
    ) -> None:
        super().__init__(
            backbone, ReptileConfig(inner_lr, inner_steps, eval_inner_steps, transductive)
        )

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

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One Reptile outer update from a meta-batch; "loss"/"acc" are the last inner step's."""
        episodes = as_meta_batch(batch)
        self.train()
        theta = {k: p.detach() for k, p in self.body_params().items()}
        delta = {k: torch.zeros_like(v) for k, v in theta.items()}
        losses, accs = [], []
        for ep in episodes:
            x = self.prep(torch.cat([ep.support_x, ep.query_x]))
            y = torch.cat([ep.support_y, ep.query_y]).to(self.device)
            phi, loss, logits = self._sgd(
                {**theta, **self.zero_head(ep.n_way, x)}, x, y, self.cfg.inner_steps
            )
            for k in delta:
                delta[k] += theta[k] - phi[k]
            losses.append(float(loss))
            accs.append(accuracy(logits, y))
        optimizer.zero_grad(set_to_none=True)
        for k, p in self.body_params().items():
            p.grad = (delta[k] / len(episodes)).to(p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": sum(losses) / len(losses), "acc": sum(accs) / len(accs)}

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Reptile:
        from fewshot.learners.base import check_support

        check_support(support_x, support_y, n_way)
        xs, ys = self.prep(support_x), support_y.to(self.device)
        with torch.enable_grad():
            params = {k: p.detach() for k, p in self.body_params().items()}
            phi, _, _ = self._sgd(
                {**params, **self.zero_head(n_way, xs)}, xs, ys, self.cfg.eval_inner_steps
            )
        self._fitted = (phi, xs)
        return self
