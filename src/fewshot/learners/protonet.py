"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

A class is represented by the mean embedding of its support images (its prototype); a query is
classified by a softmax over negative squared Euclidean distances to the prototypes, or (metric
"cosine") over scaled cosine similarities with a learnable scale (Chen et al. 2019, Gidaris &
Komodakis 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.episodes.types import Episode
from fewshot.errors import ConfigError
from fewshot.learners.base import Batch, FewShotLearner, accuracy, as_meta_batch, check_support

METRICS = ("euclidean", "cosine")


@dataclass(frozen=True)
class ProtoNetConfig:
    metric: str = "euclidean"
    init_scale: float = 10.0  # cosine only: initial value of the learnable logit scale

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(
                f"ProtoNet metric {self.metric!r} is unknown; use one of {list(METRICS)}"
            )
        if self.init_scale <= 0:
            raise ConfigError(f"ProtoNet init_scale must be > 0; got {self.init_scale}")


def prototypes(z: Tensor, y: Tensor, n_way: int) -> Tensor:
    """Class means: embeddings z (n, D), labels y (n,) in 0..n_way-1 -> (n_way, D)."""
    sums = torch.zeros(n_way, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=n_way).clamp_min(1).to(z.dtype)
    return sums / counts[:, None]


class ProtoNet(FewShotLearner):
    """ProtoNet over any backbone. Metric-based: no inner loop, inductive by construction.

    Training embeds every image of the meta-batch in one forward pass (batch-norm statistics are
    those of the whole meta-batch, as in the reference implementation); evaluation uses the
    backbone's running statistics, so a query's logits never depend on other queries.
    """

    name = "protonet"
    data_kind = "episodes"

    def __init__(
        self, backbone: nn.Module, *, metric: str = "euclidean", init_scale: float = 10.0
    ) -> None:
        super().__init__(backbone, ProtoNetConfig(metric, init_scale))
        self.log_scale = nn.Parameter(
            torch.tensor(float(init_scale)).log(), requires_grad=metric == "cosine"
        )
        self._protos: Tensor | None = None

    def logits(self, protos: Tensor, zq: Tensor) -> Tensor:
        """Prototypes (n_way, D), query embeddings (n_query, D) -> logits (n_query, n_way), fp32."""
        protos, zq = protos.float(), zq.float()
        if self.cfg.metric == "cosine":
            return self.log_scale.exp() * F.normalize(zq, dim=-1) @ F.normalize(protos, dim=-1).T
        # ||q - p||^2 = |q|^2 - 2 q.p + |p|^2 ; as one matmul, which is faster than cdist's backward
        return -(zq.pow(2).sum(-1, keepdim=True) - 2 * zq @ protos.T + protos.pow(2).sum(-1)[None])

    def meta_loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        n_s = episode.support_x.shape[0]
        z = self.backbone(self.prep(torch.cat([episode.support_x, episode.query_x])))
        return self._episode_loss(z[:n_s], z[n_s:], episode)

    def _episode_loss(self, zs: Tensor, zq: Tensor, episode: Episode) -> tuple[Tensor, Tensor]:
        dev = zs.device
        logits = self.logits(prototypes(zs, episode.support_y.to(dev), episode.n_way), zq)
        return F.cross_entropy(logits, episode.query_y.to(dev)), logits

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """All images of the meta-batch go through the backbone as one batch (fastest)."""
        episodes = as_meta_batch(batch)
        self.train()
        parts = [t for ep in episodes for t in (ep.support_x, ep.query_x)]
        with self.autocast():
            z = self.backbone(self.prep(torch.cat(parts)))
        chunks = z.split([p.shape[0] for p in parts])
        losses, accs = [], []
        for i, ep in enumerate(episodes):
            loss, logits = self._episode_loss(chunks[2 * i], chunks[2 * i + 1], ep)
            losses.append(loss)
            accs.append(accuracy(logits.detach(), ep.query_y.to(logits.device)))
        total = torch.stack(losses).mean()
        self.backward_and_step(total, optimizer)
        return {"loss": float(total.detach()), "acc": sum(accs) / len(accs)}

    @torch.no_grad()
    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> ProtoNet:
        """Store the prototypes (n_way, D) of the support set."""
        check_support(support_x, support_y, n_way)
        with self.autocast():
            zs = self.backbone(self.prep(support_x)).float()
        self._protos = prototypes(zs, support_y.to(zs.device), n_way)
        return self

    def forward(self, query_x: Tensor) -> Tensor:
        """Query images (n_query, C, H, W) -> logits (n_query, n_way) against the fitted prototypes."""
        if self._protos is None:
            raise ConfigError("ProtoNet.forward called before fit(support_x, support_y, n_way)")
        with self.autocast():
            zq = self.backbone(self.prep(query_x))
        return self.logits(self._protos, zq)
