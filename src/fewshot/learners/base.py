"""The one interface every few-shot learner implements.

A learner owns a backbone (images (N, C, H, W) -> embeddings (N, D)) and an algorithm. It computes
losses; it never calls backward or steps an optimiser (one trainer, `fewshot.training.trainer`,
owns backward, precision, accumulation, clipping and the step):

* `compute(batch) -> LearnerOutput`: named terms (`"loss"` is the differentiable objective;
  `"task"`, `"acc"`, ... are detached, for logging) plus what distillation needs (embeddings,
  episode logits, base-class logits). `batch` is a meta-batch `list[Episode]` when
  `data_kind == "episodes"`, or `(x (B, C, H, W), y (B,))` when `data_kind == "batches"`.
* `micro_batches(batch)`: how the trainer may split a batch for gradient accumulation without
  changing the gradient (tasks are independent; default: the whole batch at once).
* `fit(support_x, support_y, n_way)` then `forward(query_x)`: the two-phase API (easyfsl style).
  `predict(episode)` does both; inductive unless the learner was built with `transductive=True`.
* `deployment`: how the learner is served: the embedder (`"backbone"`, or `"bn-reestimated"`
  for learners whose batch norm ran on support statistics) and the `DecisionRule`.
* `Config`: a frozen dataclass, the one source of the learner's hyper-parameters and defaults;
  `config` = `{"name": ..., **hyperparameters}` rebuilds it (`fewshot.learners.learner_from_config`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewshot.backbones.base import Backbone
from fewshot.decision import DecisionRule
from fewshot.episodes.types import Episode
from fewshot.errors import ConfigError
from fewshot.precision import FP32, PrecisionPolicy, autocast_context, prepare_input, prepare_model

# what `compute` takes: episodes (one or a meta-batch) or a labelled batch (images, labels)
Batch = Episode | list[Episode] | tuple[Tensor, Tensor]


def embedding_dim_of(backbone: nn.Module) -> int:
    dim = getattr(backbone, "embedding_dim", None)
    if not isinstance(dim, int):
        raise ConfigError(
            f"backbone {type(backbone).__name__} has no integer `embedding_dim`; "
            "build it with fewshot.backbones.create_backbone"
        )
    return dim


def check_support(support_x: Tensor, support_y: Tensor, n_way: int) -> None:
    """Raise a ConfigError naming the problem when a support set is malformed."""
    if support_x.dim() != 4:
        raise ConfigError(
            f"support_x must be (n_way * n_shot, C, H, W); got shape {tuple(support_x.shape)}"
        )
    if support_y.shape != (support_x.shape[0],):
        raise ConfigError(
            f"support_y has shape {tuple(support_y.shape)}; expected ({support_x.shape[0]},) to match support_x"
        )
    present = torch.unique(support_y)
    if present.numel() != n_way or int(present.min()) != 0 or int(present.max()) != n_way - 1:
        raise ConfigError(
            f"support labels {present.tolist()} must cover 0..{n_way - 1} exactly once each for n_way={n_way}"
        )


@dataclass
class LearnerOutput:
    """What `compute` returns. `terms["loss"]` is the differentiable objective of the batch."""
    terms: dict[str, Tensor]
    images: Tensor | None = None  # (N, C, H, W) float inputs in the order of `embeddings`
    embeddings: Tensor | None = None  # (N, D) fp32, differentiable
    episodes: list[Episode] = field(default_factory=list)
    episode_logits: list[Tensor] = field(default_factory=list)  # per episode (n_query, n_way)
    class_logits: Tensor | None = None  # (B, num_classes) for learners that train on batches
    labels: Tensor | None = None  # (B,) labels of `class_logits`


@dataclass(frozen=True)
class Deployment:
    """How a learner is served: embedder + decision rule (recorded in the bundle manifest)."""
    embedder: str  # "backbone" (eval mode) | "bn-reestimated" (running statistics re-estimated)
    rule: DecisionRule


class FewShotLearner(nn.Module):
    """Base class: see the module docstring for the contract."""
    name: ClassVar[str] = "base"
    data_kind: ClassVar[str] = "episodes"  # or "batches"
    Config: ClassVar[type] = object

    def __init__(self, backbone: Backbone, **kwargs: object) -> None:
        super().__init__()
        self.backbone: Backbone = backbone
        try:
            self.cfg = self.Config(**kwargs)
        except TypeError as exc:
            fields = [f.name for f in dataclasses.fields(self.Config)]
            raise ConfigError(
                f"learner {self.name!r}: bad arguments {kwargs} ({exc}); valid: {fields}"
            ) from None
        self.precision: PrecisionPolicy = FP32

    # ---- description -------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, object]:
        """`{"name": ..., **hyperparameters}`; pass to `learner_from_config` with the backbone."""
        return {"name": self.name, **dataclasses.asdict(self.cfg)}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def deployment(self) -> Deployment:
        return Deployment("backbone", DecisionRule("prototype", "euclidean"))

    # ---- precision ---------------------------------------------------------------------------
    def set_precision(self, policy: PrecisionPolicy) -> FewShotLearner:
        """Run compute / predict under `policy` (see fewshot.precision); returns self."""
        self.precision = policy
        prepare_model(self, policy)
        return self

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        return autocast_context(self.precision, self.device)

    def prep(self, x: Tensor) -> Tensor:
        """Move images to the learner's device and memory format."""
        return prepare_input(x.to(self.device, non_blocking=True), self.precision)

    # ---- training ----------------------------------------------------------------------------
    def compute(self, batch: Batch) -> LearnerOutput:
        raise NotImplementedError

    def micro_batches(self, batch: Batch) -> list[Batch]:
        """Pieces the trainer may backpropagate one at a time (same gradient, less memory)."""
        return [batch]

    # ---- inference ---------------------------------------------------------------------------
    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> FewShotLearner:
        """Adapt to a support set (labels 0..n_way-1, each present); refuses a malformed one,
        naming the problem, before any learner sees it. Learners implement `_fit`."""
        check_support(support_x, support_y, n_way)
        return self._fit(support_x, support_y, n_way)

    def _fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> FewShotLearner:
        raise NotImplementedError

    def forward(self, query_x: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, episode: Episode) -> Tensor:
        """Logits (n_query, n_way) for the episode's queries after fitting its support set."""
        self.eval()
        self.fit(episode.support_x, episode.support_y, episode.n_way)
        with torch.no_grad():
            return self.forward(episode.query_x).float()


def episode_terms(losses: list[Tensor], logits: list[Tensor], episodes: list[Episode]) -> dict[str, Tensor]:
    """Mean query loss over a meta-batch (the objective) and mean query accuracy (detached)."""
    loss = torch.stack(losses).mean()
    acc = torch.stack([
        (lg.detach().argmax(-1) == ep.query_y.to(lg.device)).float().mean()
        for lg, ep in zip(logits, episodes)
    ]).mean()
    return {"loss": loss, "task": loss.detach(), "acc": acc}


def as_meta_batch(batch: Batch) -> list[Episode]:
    if isinstance(batch, Episode):
        return [batch]
    episodes = [e for e in batch if isinstance(e, Episode)] if isinstance(batch, (list, tuple)) else []
    if not episodes or len(episodes) != len(batch):
        raise ConfigError(
            f"episodic learners take a non-empty list[Episode] meta-batch; got {type(batch).__name__}"
        )
    return episodes
