"""Linear probe: multinomial logistic regression on L2-normalised embeddings (Tian et al.,
"Rethinking Few-Shot Image Classification: a Good Embedding Is All You Need?", ECCV 2020,
arXiv:2003.11539, who fit sklearn's LogisticRegression on normalised features).

Objective (sklearn's, divided by n): mean cross-entropy + ||W||^2 / (2 * C * n), bias unpenalised.
Fitted in fp32 with full-batch L-BFGS from zero weights: deterministic for a given input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.errors import ConfigError


def fit_linear_probe(
    z: Tensor, y: Tensor, n_way: int, *, c: float = 1.0, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Embeddings z (n, D), labels y (n,) in 0..n_way-1 -> weight (n_way, D), bias (n_way,).

    z is L2-normalised here; apply `probe_logits` to raw query embeddings.
    """
    if c <= 0:
        raise ConfigError(f"probe regularisation C must be > 0; got {c}")
    z = F.normalize(z.detach().float(), dim=-1)
    n, d = z.shape
    w = torch.zeros(n_way, d, device=z.device, requires_grad=True)
    b = torch.zeros(n_way, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + w.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad(), torch.autocast(z.device.type, enabled=False):
        opt.step(closure)
    return w.detach(), b.detach()


def probe_logits(w: Tensor, b: Tensor, z: Tensor) -> Tensor:
    """Query embeddings z (n_query, D) -> logits (n_query, n_way) of a fitted probe (fp32)."""
    return F.normalize(z.float(), dim=-1) @ w.T + b
