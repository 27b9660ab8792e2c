"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

A class is represented by the mean embedding of its support images (its prototype); a query is
classified by a softmax over negative squared Euclidean distances to the prototypes, or (metric
"cosine") over scaled cosine similarities with a learnable scale (Chen et al. 2019, Gidaris &
Komodakis 2018). The rule itself lives in `fewshot.decision`, shared with export and the service.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones.base import Backbone
from fewshot.decision import DecisionRule, Metric, check_metric, prototype_logits, prototypes
from fewshot.errors import ConfigError
from fewshot.learners.base import (
    Batch,
    Deployment,
    FewShotLearner,
    LearnerOutput,
    as_meta_batch,
    episode_terms,
)


@dataclass(frozen=True)
class ProtoNetConfig:
    metric: Metric = "euclidean"
    init_scale: float = 10.0  # cosine only: initial value of the learnable logit scale

    def __post_init__(self) -> None:
        check_metric(self.metric)
        if self.init_scale <= 0:
            raise ConfigError(f"ProtoNet init_scale must be > 0; got {self.init_scale}")


class ProtoNet(FewShotLearner):
    """ProtoNet over any backbone. Metric-based: no inner loop, inductive by construction.

    Training embeds every image of the meta-batch in one forward pass (batch-norm statistics are
    those of the whole meta-batch, as in the reference implementation); evaluation uses the
    backbone's running statistics, so a query's logits never depend on other queries.
    """

    name = "protonet"
    data_kind = "episodes"
    Config = ProtoNetConfig
    cfg: ProtoNetConfig

    def __init__(self, backbone: Backbone, **kwargs: object) -> None:
        super().__init__(backbone, **kwargs)
        self.log_scale = nn.Parameter(
            torch.tensor(float(self.cfg.init_scale)).log(), requires_grad=self.cfg.metric == "cosine"
        )
        self._protos: Tensor | None = None

    @property
    def deployment(self) -> Deployment:
        scale = float(self.log_scale.detach().exp())
        return Deployment("backbone", DecisionRule("prototype", self.cfg.metric, cosine_scale=scale))

    def logits(self, protos: Tensor, zq: Tensor) -> Tensor:
        """Prototypes (n_way, D), query embeddings (n_query, D) -> logits (n_query, n_way), fp32."""
        return prototype_logits(zq, protos, self.cfg.metric, self.log_scale.exp())

    def compute(self, batch: Batch) -> LearnerOutput:
        """All images of the meta-batch go through the backbone as one batch (fastest)."""
        episodes = as_meta_batch(batch)
        self.train()
        parts = [t for ep in episodes for t in (ep.support_x, ep.query_x)]
        images = self.prep(torch.cat(parts))
        with self.autocast():
            z = self.backbone(images).float()
        chunks = z.split([p.shape[0] for p in parts])
        losses, logits = [], []
        for i, ep in enumerate(episodes):
            zs, zq = chunks[2 * i], chunks[2 * i + 1]
            lg = self.logits(prototypes(zs, ep.support_y.to(zs.device), ep.n_way), zq)
            losses.append(F.cross_entropy(lg, ep.query_y.to(lg.device)))
            logits.append(lg)
        return LearnerOutput(episode_terms(losses, logits, episodes), images=images, embeddings=z,
                             episodes=episodes, episode_logits=logits)

    @torch.no_grad()
    def _fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> ProtoNet:
        """Store the prototypes (n_way, D) of the support set."""
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
