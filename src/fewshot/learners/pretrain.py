"""Standard pre-training + linear-probe evaluation (Tian et al. 2020, arXiv:2003.11539; Chen et al.
2019 "A Closer Look at Few-shot Classification", arXiv:1904.04232).

Training: cross-entropy over all `num_classes` training classes on ordinary mini-batches
(`data_kind = "batches"`). Evaluation: the backbone in eval mode (running batch-norm statistics,
so inductive) embeds the support set, the linear probe of `fewshot.decision` (logistic regression
on L2-normalised embeddings) is fitted on it, and queries are scored by the probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones.base import Backbone
from fewshot.backbones.init import built_quietly
from fewshot.decision import DecisionRule, Probe, fit_probe
from fewshot.errors import ConfigError
from fewshot.learners.base import (
    Batch,
    Deployment,
    FewShotLearner,
    LearnerOutput,
    embedding_dim_of,
)


@dataclass(frozen=True)
class PretrainConfig:
    num_classes: int
    probe_c: float = 1.0  # inverse L2 strength of the probe (sklearn's C)
    probe_max_iter: int = 100

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(
                f"num_classes must be >= 2 (all training classes); got {self.num_classes}"
            )
        if self.probe_c <= 0 or self.probe_max_iter < 1:
            raise ConfigError(
                f"probe_c must be > 0 and probe_max_iter >= 1; got {self.probe_c}, {self.probe_max_iter}"
            )


class Pretrain(FewShotLearner):
    name = "pretrain"
    data_kind = "batches"
    Config = PretrainConfig
    cfg: PretrainConfig

    def __init__(self, backbone: Backbone, **kwargs: object) -> None:
        super().__init__(backbone, **kwargs)
        with built_quietly():
            self.classifier = nn.Linear(embedding_dim_of(backbone), self.cfg.num_classes)
        self._probe: Probe | None = None

    @property
    def deployment(self) -> Deployment:
        rule = DecisionRule("probe", probe_c=self.cfg.probe_c, probe_max_iter=self.cfg.probe_max_iter)
        return Deployment("backbone", rule)

    def compute(self, batch: Batch) -> LearnerOutput:
        """Cross-entropy on a batch (x (B, C, H, W), y (B,)) with labels in 0..num_classes-1."""
        if (
            not isinstance(batch, (tuple, list))
            or len(batch) != 2
            or not isinstance(batch[0], Tensor)
        ):
            raise ConfigError(f"'pretrain' takes (x, y) batches; got {type(batch).__name__}")
        x, y = batch
        y = y.to(self.device)
        if int(y.max()) >= self.cfg.num_classes or int(y.min()) < 0:
            raise ConfigError(
                f"labels must be in 0..{self.cfg.num_classes - 1}; got range {int(y.min())}..{int(y.max())}"
            )
        self.train()
        images = self.prep(x)
        with self.autocast():
            z = self.backbone(images).float()
        logits = self.classifier(z)
        loss = F.cross_entropy(logits, y)
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return LearnerOutput({"loss": loss, "task": loss.detach(), "acc": acc}, images=images,
                             embeddings=z, class_logits=logits, labels=y)

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        with self.autocast():
            return self.backbone(self.prep(x)).float()

    def _fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Pretrain:
        was_training = self.training
        self.eval()
        z = self.embed(support_x)
        self._probe = fit_probe(z, support_y.to(z.device), n_way, c=self.cfg.probe_c,
                                max_iter=self.cfg.probe_max_iter)
        self.train(was_training)
        return self

    def forward(self, query_x: Tensor) -> Tensor:
        if self._probe is None:
            raise ConfigError("Pretrain.forward called before fit(support_x, support_y, n_way)")
        was_training = self.training
        self.eval()
        logits = self._probe.logits(self.embed(query_x))
        self.train(was_training)
        return logits
