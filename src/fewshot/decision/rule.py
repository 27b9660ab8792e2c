"""The heads of the decision: how support and query embeddings become scores and logits.

* Nearest prototype (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot Learning",
  NeurIPS 2017): a class is the mean of its support embeddings; a query's logits are the negative
  squared Euclidean distances to the prototypes, or scaled cosine similarities ("cosine").
* Linear probe (Tian et al., "Rethinking Few-Shot Image Classification: a Good Embedding Is All
  You Need?", ECCV 2020): multinomial logistic regression on L2-normalised embeddings, objective
  mean cross-entropy + ||W||^2 / (2 C n) (sklearn's, divided by n), bias unpenalised, full-batch
  L-BFGS from zero weights in fp32: deterministic for a given input.

Everything here is torch in, torch out, fp32 (`prototype_scores` also takes numpy arrays, for the
service's per-request path; other `numpy` callers wrap with `torch.from_numpy`, zero copy). No
autocast: the rules run in fp32 whatever the backbone's precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.decision.views import check_views
from fewshot.errors import ConfigError

Metric = Literal["euclidean", "cosine"]
METRICS: tuple[Metric, ...] = ("euclidean", "cosine")
Rule = Literal["prototype", "probe"]
RULES: tuple[Rule, ...] = ("prototype", "probe")
# numpy problems up to this many multiply-adds are scored in numpy: below OpenBLAS's thresholds for
# starting threads (gemv 9,216; gemm 262,144), so numpy stays on the caller's thread
SMALL_SCORES = 8192


def check_metric(metric: str) -> Metric:
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r} is unknown; use one of {list(METRICS)}")
    return metric  # type: ignore[return-value]


def prototypes(z: Tensor, y: Tensor, n_way: int) -> Tensor:
    """Class means: embeddings z (n, D), labels y (n,) in 0..n_way-1 -> (n_way, D)."""
    sums = torch.zeros(n_way, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, y, z)
    counts = torch.bincount(y, minlength=n_way).clamp_min(1).to(z.dtype)
    return sums / counts[:, None]


@overload
def prototype_scores(q: Tensor, protos: Tensor, metric: Metric, proto_sq: Tensor | None = None) -> Tensor: ...
@overload
def prototype_scores(q: np.ndarray, protos: np.ndarray, metric: Metric,
                     proto_sq: np.ndarray | None = None) -> np.ndarray: ...
def prototype_scores(q: Tensor | np.ndarray, protos: Tensor | np.ndarray, metric: Metric,
                     proto_sq: Tensor | np.ndarray | None = None) -> Tensor | np.ndarray:
    """(N, D) queries vs (K, D) prototypes -> (N, K) fp32: squared distances for "euclidean" (lower
    is closer), cosine similarities for "cosine" (higher is closer). One matrix product (faster than
    cdist and its backward); `proto_sq` (K,) may pass precomputed squared norms.

    Tensors in, a tensor out (training: differentiable); numpy arrays in, an array out (the
    service). A small numpy problem (at most `SMALL_SCORES` multiply-adds: one query against a
    typical workspace) is computed in numpy, where a few torch calls cost several times as much; a
    larger one in torch, whose thread count the service pins, where numpy's BLAS would start its
    own threads. Cosine divides by max(norm, 1e-12) in both, as `F.normalize` does."""
    if isinstance(q, np.ndarray) and isinstance(protos, np.ndarray):
        sq_np = None if proto_sq is None else np.asarray(proto_sq)
        if q.shape[0] * protos.shape[0] * protos.shape[-1] <= SMALL_SCORES:
            return _scores_np(q, protos, metric, sq_np)
        sq_t = None if sq_np is None else _f32(sq_np)
        return prototype_scores(_f32(q), _f32(protos), metric, sq_t).numpy()
    if isinstance(q, np.ndarray) or isinstance(protos, np.ndarray) or isinstance(proto_sq, np.ndarray):
        raise TypeError("prototype_scores takes all tensors or all numpy arrays, not a mix")
    q, protos = q.float(), protos.float()
    if metric == "cosine":
        return F.normalize(q, dim=-1) @ F.normalize(protos, dim=-1).T
    sq = protos.pow(2).sum(-1) if proto_sq is None else proto_sq.float()
    return (q.pow(2).sum(-1, keepdim=True) - 2.0 * q @ protos.T + sq[None, :]).clamp_min(0.0)


def _f32(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _scores_np(q: np.ndarray, protos: np.ndarray, metric: Metric, proto_sq: np.ndarray | None) -> np.ndarray:
    # float64 arithmetic, float32 out: the same answer whatever the BLAS kernel's summation order
    q64, p64 = np.asarray(q, np.float64), np.asarray(protos, np.float64)
    if metric == "cosine":
        qn = q64 / np.maximum(np.sqrt((q64 * q64).sum(-1, keepdims=True)), 1e-12)
        pn = p64 / np.maximum(np.sqrt((p64 * p64).sum(-1, keepdims=True)), 1e-12)
        return (qn @ pn.T).astype(np.float32)
    sq = (p64 * p64).sum(-1) if proto_sq is None else np.asarray(proto_sq, np.float64)
    return np.maximum((q64 * q64).sum(-1, keepdims=True) - 2.0 * (q64 @ p64.T) + sq[None, :], 0.0).astype(np.float32)


@overload
def scores_to_logits(scores: Tensor, metric: Metric, cosine_scale: float | Tensor = 10.0) -> Tensor: ...
@overload
def scores_to_logits(scores: np.ndarray, metric: Metric, cosine_scale: float = 10.0) -> np.ndarray: ...
def scores_to_logits(scores: Tensor | np.ndarray, metric: Metric,
                     cosine_scale: float | Tensor = 10.0) -> Tensor | np.ndarray:
    """Prototype scores (N, K) -> logits: -d^2 for "euclidean", scale * cos for "cosine". Torch
    in training (a learnt scale), numpy in the served decision (a request's handful of numbers)."""
    return -scores if metric == "euclidean" else cosine_scale * scores  # type: ignore[operator]


def prototype_logits(
    q: Tensor, protos: Tensor, metric: Metric, cosine_scale: float | Tensor = 10.0
) -> Tensor:
    """Query embeddings (N, D), prototypes (K, D) -> logits (N, K), fp32 (differentiable)."""
    return scores_to_logits(prototype_scores(q, protos, metric), metric, cosine_scale)


@dataclass(frozen=True)
class Probe:
    """A fitted linear probe: logits = normalize(z) @ weight.T + bias."""

    weight: Tensor  # (K, D)
    bias: Tensor  # (K,)

    def logits(self, z: Tensor) -> Tensor:
        """Embeddings (N, D) -> logits (N, K), fp32."""
        return F.normalize(z.float(), dim=-1) @ self.weight.T + self.bias


def fit_probe(z: Tensor, y: Tensor, n_classes: int, *, c: float = 1.0, max_iter: int = 100) -> Probe:
    """Embeddings z (n, D), labels y (n,) in 0..n_classes-1 -> a fitted `Probe`."""
    if c <= 0:
        raise ConfigError(f"probe regularisation C must be > 0; got {c}")
    if max_iter < 1:
        raise ConfigError(f"probe max_iter must be >= 1; got {max_iter}")
    zn = F.normalize(z.detach().float(), dim=-1)
    y = y.to(zn.device)
    n, d = zn.shape
    w = torch.zeros(n_classes, d, device=zn.device, requires_grad=True)
    b = torch.zeros(n_classes, device=zn.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(zn @ w.T + b, y) + w.pow(2).sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad(), torch.autocast(zn.device.type, enabled=False):
        opt.step(closure)
    return Probe(w.detach(), b.detach())


@dataclass(frozen=True)
class DecisionRule:
    """The head of a decision: nearest prototype or probe, its metric, cosine scale, probe
    parameters (C, max_iter) and the views a taught image is embedded with (`fewshot.decision.
    views`). Learners carry one (`Deployment.rule`); a served decision
    (`fewshot.decision.ServedDecision`) is this head plus its open-set rule."""

    rule: Rule = "prototype"
    metric: Metric = "euclidean"
    cosine_scale: float = 10.0
    probe_c: float = 1.0
    probe_max_iter: int = 100
    # the views of a taught image averaged into the embedding its class keeps (fewshot.decision.views)
    views: str = "none"
    view_shift: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"decision rule {self.rule!r} is unknown; use one of {list(RULES)}")
        check_metric(self.metric)
        check_views(self.views, self.view_shift)

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "metric": self.metric, "cosine_scale": self.cosine_scale,
                "probe_c": self.probe_c, "probe_max_iter": self.probe_max_iter, "views": self.views,
                "view_shift": self.view_shift}

    @classmethod
    def from_dict(cls, d: dict[str, object] | None) -> DecisionRule:
        if not d:
            return cls()
        try:
            return cls(**d)  # type: ignore[arg-type]
        except TypeError as exc:
            raise ConfigError(f"decision rule {d!r} has unknown fields ({exc})") from exc
