"""Standard pre-training + linear-probe evaluation (Tian et al. 2020, arXiv:2003.11539; Chen et al.
2019 "A Closer Look at Few-shot Classification", arXiv:1904.04232).

Training: cross-entropy over all `num_classes` training classes on ordinary mini-batches
(`data_kind = "batches"`). Evaluation: the backbone in eval mode (running batch-norm statistics,
so inductive) embeds the support set, a logistic-regression probe is fitted on the L2-normalised
embeddings (fewshot.learners.probe), and queries are scored by the probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.episodes.types import Episode
from fewshot.errors import ConfigError
from fewshot.learners.base import Batch, FewShotLearner, accuracy, check_support, embedding_dim_of
from fewshot.learners.probe import fit_linear_probe, probe_logits


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

    def __init__(
        self,
        backbone: nn.Module,
        *,
        num_classes: int,
        probe_c: float = 1.0,
        probe_max_iter: int = 100,
    ) -> None:
        super().__init__(backbone, PretrainConfig(num_classes, probe_c, probe_max_iter))
        self.classifier = nn.Linear(embedding_dim_of(backbone), num_classes)
        self._probe: tuple[Tensor, Tensor] | None = None

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """One cross-entropy step on a batch (x (B, C, H, W), y (B,)) with labels in 0..num_classes-1."""
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
        with self.autocast():
            logits = self.classifier(self.backbone(self.prep(x))).float()
        loss = F.cross_entropy(logits, y)
        self.backward_and_step(loss, optimizer)
        return {"loss": float(loss.detach()), "acc": accuracy(logits.detach(), y)}

    def meta_loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        """Probe loss on the queries (no gradient to the backbone: evaluation only)."""
        self.fit(episode.support_x, episode.support_y, episode.n_way)
        with torch.no_grad():
            logits = self.forward(episode.query_x)
        return F.cross_entropy(logits, episode.query_y.to(logits.device)), logits

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        with self.autocast():
            return self.backbone(self.prep(x)).float()

    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> Pretrain:
        check_support(support_x, support_y, n_way)
        was_training = self.training
        self.eval()
        z = self.embed(support_x)
        self._probe = fit_linear_probe(
            z, support_y.to(z.device), n_way, c=self.cfg.probe_c, max_iter=self.cfg.probe_max_iter
        )
        self.train(was_training)
        return self

    def forward(self, query_x: Tensor) -> Tensor:
        if self._probe is None:
            raise ConfigError("Pretrain.forward called before fit(support_x, support_y, n_way)")
        was_training = self.training
        self.eval()
        logits = probe_logits(*self._probe, self.embed(query_x))
        self.train(was_training)
        return logits
