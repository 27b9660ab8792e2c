"""The one interface every few-shot learner implements.

A learner owns a backbone (images (N, C, H, W) -> embeddings (N, D)) and an algorithm:

* `train_step(batch, optimizer)`: one outer update. `batch` is a meta-batch `list[Episode]` when
  `data_kind == "episodes"`, or `(x (B, C, H, W), y (B,))` when `data_kind == "batches"`.
* `meta_loss(episode)`: `(loss, query_logits (n_query, n_way))` for one episode.
* `fit(support_x, support_y, n_way)` then `forward(query_x)`: the two-phase deployment API
  (easyfsl style). `predict(episode)` does both and is always inductive unless the learner was
  built with `transductive=True`: each query's logits depend only on the support set and itself.
* `config`: `{"name": ..., **hyperparameters}`; with the backbone's own config it rebuilds the
  learner (`fewshot.learners.learner_from_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fewshot.episodes.types import Episode
from fewshot.errors import ConfigError
from fewshot.precision import FP32, PrecisionPolicy, autocast_context, prepare_input

Batch = Any  # list[Episode] | tuple[Tensor, Tensor]


def embedding_dim_of(backbone: nn.Module) -> int:
    dim = getattr(backbone, "embedding_dim", None)
    if not isinstance(dim, int):
        raise ConfigError(
            f"backbone {type(backbone).__name__} has no integer `embedding_dim`; "
            "build it with fewshot.backbones.create_backbone"
        )
    return dim


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of rows of `logits` (n, n_way) whose argmax equals `y` (n,)."""
    return float((logits.argmax(-1) == y).float().mean().item())


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


class FewShotLearner(nn.Module):
    """Base class: see the module docstring for the contract."""

    name: ClassVar[str] = "base"
    data_kind: ClassVar[str] = "episodes"  # or "batches"

    def __init__(self, backbone: nn.Module, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.precision: PrecisionPolicy = FP32
        self._scaler: torch.amp.GradScaler | None = None

    # ---- description -------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """`{"name": ..., **hyperparameters}`; pass to `learner_from_config` with the backbone."""
        return {"name": self.name, **dataclasses.asdict(self.cfg)}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- precision ---------------------------------------------------------------------------
    def set_precision(self, policy: PrecisionPolicy) -> FewShotLearner:
        """Run train_step / predict under `policy` (see fewshot.precision); returns self."""
        from fewshot.precision import prepare_model

        self.precision = policy
        prepare_model(self, policy)
        self._scaler = (
            torch.amp.GradScaler(policy.device_type) if policy.needs_grad_scaler else None
        )
        return self

    def autocast(self) -> Any:
        return autocast_context(self.precision, self.device)

    def prep(self, x: Tensor) -> Tensor:
        """Move images to the learner's device and memory format."""
        return prepare_input(x.to(self.device, non_blocking=True), self.precision)

    def backward(self, loss: Tensor) -> None:
        """loss.backward(), loss-scaled under an fp16 policy; gradients accumulate."""
        if self._scaler is None:
            loss.backward()
        else:
            self._scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step() (through the GradScaler under fp16), then zero_grad."""
        if self._scaler is None:
            optimizer.step()
        else:
            self._scaler.step(optimizer)
            self._scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def backward_and_step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.step(optimizer)

    # ---- training ----------------------------------------------------------------------------
    def meta_loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no per-episode meta loss")

    def train_step(self, batch: Batch, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Default episodic step: mean `meta_loss` over the meta-batch, one optimizer step."""
        episodes = as_meta_batch(batch)
        self.train()
        losses, accs = [], []
        for ep in episodes:
            with self.autocast():
                loss, logits = self.meta_loss(ep)
            losses.append(loss)
            accs.append(accuracy(logits.detach(), ep.query_y.to(logits.device)))
        total = torch.stack(losses).mean()
        self.backward_and_step(total, optimizer)
        return {"loss": float(total.detach()), "acc": sum(accs) / len(accs)}

    # ---- inference ---------------------------------------------------------------------------
    def fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> FewShotLearner:
        raise NotImplementedError

    def forward(self, query_x: Tensor) -> Tensor:  # type: ignore[override]
        raise NotImplementedError

    def predict(self, episode: Episode) -> Tensor:
        """Logits (n_query, n_way) for the episode's queries after fitting its support set."""
        self.eval()
        self.fit(episode.support_x, episode.support_y, episode.n_way)
        with torch.no_grad():
            return self.forward(episode.query_x).float()


def as_meta_batch(batch: Batch) -> list[Episode]:
    if isinstance(batch, Episode):
        return [batch]
    if (
        not isinstance(batch, (list, tuple))
        or not batch
        or not all(isinstance(e, Episode) for e in batch)
    ):
        raise ConfigError(
            f"episodic learners take a non-empty list[Episode] meta-batch; got {type(batch).__name__}"
        )
    return list(batch)
