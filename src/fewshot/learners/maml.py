"""The MAML family: MAML / first-order MAML (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400),
ANIL (Raghu et al., ICLR 2020, arXiv:1909.09157) and Meta-SGD (Li et al. 2017, arXiv:1707.09835).

Model: backbone embedding (D,) -> linear head (n_way, D). Inner loops are pure functions over a
dict of tensors run with `torch.func.functional_call`; the module's own parameters are the
meta-parameters and are never patched.

Head: zero-initialised for every task (as in MAML++ / ANIL / "unicorn" MAML practice). A learned
n_way head would tie meaning to arbitrary episode label order and fix n_way; a zero head is
label-permutation invariant, works for any n_way, and after one step is a prototype-like
classifier (Triantafillou et al. 2020).

Batch norm ("MetaBN", Bronskill et al. 2020; see fewshot.backbones.norm): every forward pass
normalises with the statistics of the task's support set. Inner steps see support batch
statistics (as in classic MAML); query images are run in the same batch as the support set but
normalised with the support statistics, so a query's logits depend only on the support set and
itself (inductive), in training and evaluation alike, and running statistics are never used.
Classic MAML normalised queries with their own batch statistics, which is transductive; pass
`transductive=True` for that behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fewshot.backbones.base import Backbone
from fewshot.backbones.norm import context_statistics, episodic_norms, grouped_context_statistics
from fewshot.decision import DecisionRule
from fewshot.episodes.types import Episode
from fewshot.errors import ConfigError
from fewshot.learners.base import (
    Batch,
    Deployment,
    FewShotLearner,
    LearnerOutput,
    as_meta_batch,
    embedding_dim_of,
    episode_terms,
)

Params = dict[str, Tensor]
HEAD_W, HEAD_B = "head.weight", "head.bias"
CPU_CLOSED_FORM_CHUNK = 4


class InnerLoopConfig(Protocol):
    """What the shared inner-loop machinery reads of its learner's config."""

    @property
    def inner_lr(self) -> float: ...
    @property
    def inner_steps(self) -> int: ...
    @property
    def eval_inner_steps(self) -> int: ...
    @property
    def first_order(self) -> bool: ...
    @property
    def transductive(self) -> bool: ...


class InnerLoopChecks:
    """The checks every inner-loop config (MAML family, Reptile) runs on its step size and step counts."""

    inner_lr: float
    inner_steps: int
    eval_inner_steps: int

    def __post_init__(self) -> None:
        if self.inner_lr <= 0:
            raise ConfigError(f"inner_lr must be > 0; got {self.inner_lr}")
        if self.inner_steps < 1 or self.eval_inner_steps < 1:
            raise ConfigError(
                f"inner_steps and eval_inner_steps must be >= 1; got {self.inner_steps}, {self.eval_inner_steps}"
            )


@dataclass(frozen=True)
class MAMLConfig(InnerLoopChecks):
    inner_lr: float = 0.4  # Finn et al. Omniglot value
    inner_steps: int = 1  # inner steps per task in meta-training
    # Inner steps when fitting a support set at evaluation. Keep it equal to inner_steps: with the
    # zero head the first step never moves the body, so a body meta-trained with one step was never
    # trained to be adapted, and extra test-time steps hurt (measured: 92.7% -> 59.8% at 5-way 5-shot).
    eval_inner_steps: int = 1
    first_order: bool = False
    transductive: bool = False



class GradientLearner(FewShotLearner):
    """Shared functional machinery: embed / head / inner update with per-task fast weights.

    Deployment: batch norm ran on support statistics, so the running statistics were never
    trained; the deployed embedder re-estimates them on training support sets
    (`fewshot.training.deploy.reestimate_batch_norm`), and the rule is chosen at export on
    validation episodes (the zero-head one-step update is a prototype-like classifier)."""

    cfg: InnerLoopConfig  # MAMLConfig | ReptileConfig

    def __init__(self, backbone: Backbone, **kwargs: object) -> None:
        super().__init__(backbone, **kwargs)
        self.embedding_dim = embedding_dim_of(backbone)
        episodic_norms(backbone)  # raises early if the backbone uses plain batch norm
        self._fitted: tuple[Params, Tensor] | None = None

    @property
    def deployment(self) -> Deployment:
        return Deployment("bn-reestimated", DecisionRule("prototype", "euclidean"))

    # ---- the functional model ------------------------------------------------------------------
    def body_params(self) -> Params:
        return dict(self.backbone.named_parameters())

    def zero_head(self, n_way: int, like: Tensor) -> Params:
        """Per-task head (n_way, D) + (n_way,), zeros, a leaf that the inner loop differentiates."""
        w = torch.zeros(n_way, self.embedding_dim, device=like.device, requires_grad=True)
        b = torch.zeros(n_way, device=like.device, requires_grad=True)
        return {HEAD_W: w, HEAD_B: b}

    def embed(self, params: Params, x: Tensor, n_context: int) -> Tensor:
        """(N, C, H, W) -> (N, D) with fast weights; batch norm uses statistics of rows [:n_context]."""
        body = {k: v for k, v in params.items() if not k.startswith("head.")}
        with context_statistics(self.backbone, n_context):
            return functional_call(self.backbone, body, (x,))

    @staticmethod
    def head(params: Params, z: Tensor) -> Tensor:
        """Embeddings (N, D) -> logits (N, n_way), fp32."""
        return F.linear(z.float(), params[HEAD_W].float(), params[HEAD_B].float())

    def logits(self, params: Params, x: Tensor, n_context: int) -> Tensor:
        return self.head(params, self.embed(params, x, n_context))

    def query_logits(self, params: Params, xs: Tensor, xq: Tensor) -> Tensor:
        """Logits (n_query, n_way). Inductive: queries normalised with support statistics."""
        if self.cfg.transductive:
            return self.logits(params, xq, xq.shape[0])
        return self.logits(params, torch.cat([xs, xq]), xs.shape[0])[xs.shape[0] :]

    # ---- inner loop ------------------------------------------------------------------------------
    def inner_lr(self, name: str) -> Tensor | float:
        return self.cfg.inner_lr

    def adapts(self, name: str) -> bool:
        return True

    def inner_update(self, params: Params, loss: Tensor, create_graph: bool) -> Params:
        """One SGD step on the adapted subset: theta' = theta - lr * dL/dtheta."""
        names = [k for k in params if self.adapts(k)]
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
        new = dict(params)
        for k, g in zip(names, grads):
            new[k] = params[k] - self.inner_lr(k) * g
        return new

    def adapt(
        self, params: Params, xs: Tensor, ys: Tensor, steps: int, create_graph: bool
    ) -> Params:
        for _ in range(steps):
            loss = F.cross_entropy(self.logits(params, xs, xs.shape[0]), ys)
            params = self.inner_update(params, loss, create_graph)
        return params

    def _tensors(self, ep: Episode) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dev = self.device
        return (
            self.prep(ep.support_x),
            ep.support_y.to(dev),
            self.prep(ep.query_x),
            ep.query_y.to(dev),
        )

    # ---- FewShotLearner ---------------------------------------------------------------------------
    def meta_loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        xs, ys, xq, yq = self._tensors(episode)
        create_graph = self.training and not self.cfg.first_order
        steps = self.cfg.inner_steps if self.training else self.cfg.eval_inner_steps
        params = {**self.body_params(), **self.zero_head(episode.n_way, xs)}
        params = self.adapt(params, xs, ys, steps, create_graph)
        logits = self.query_logits(params, xs, xq)
        return F.cross_entropy(logits, yq), logits

    def _closed_form_ok(self, episodes: list[Episode]) -> bool:
        """One inner step from the zero head, inductive, same-shaped tasks: the batched fast path."""
        shapes = {(e.support_x.shape, e.query_x.shape, e.n_way) for e in episodes}
        return (
            self.cfg.inner_steps == 1
            and not self.cfg.transductive
            and type(self).meta_loss is GradientLearner.meta_loss
            and len(shapes) == 1
        )

    def _closed_form_meta_loss(self, episodes: list[Episode]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The exact one-step update for a whole meta-batch in one batched forward pass.

        From the zero head the support loss has no gradient for the body (dL/dz = dL/dlogits @ W
        = 0), so the one inner step changes only the head, and in closed form
            W' = lr / S * sum_i (onehot(y_i) - 1/n) z_i^T,   b' = lr / S * sum_i (onehot(y_i) - 1/n)
        (the gradient of the mean cross-entropy at uniform softmax). Differentiating through W'
        gives MAML's second-order term; first-order MAML detaches it. All tasks go through the
        backbone together with per-task support statistics in batch norm (`GroupedContextNorm`:
        one pass, hand-written backward): same numbers as the per-task loop (tested), one pass
        instead of 2 x meta-batch.
        Returns (mean query loss, query logits (T, Q, n_way), embeddings (T * (S + Q), D), images).
        """
        dev = self.device
        t = len(episodes)
        n_way, s = episodes[0].n_way, episodes[0].support_x.shape[0]
        x = self.prep(torch.cat([torch.cat([e.support_x, e.query_x]) for e in episodes]))
        ys = torch.stack([e.support_y for e in episodes]).to(dev)  # (T, S)
        yq = torch.stack([e.query_y for e in episodes]).to(dev)  # (T, Q)
        body: Params = dict(self.backbone.named_parameters())
        if self.device.type == "cpu" and not self.precision.channels_last:
            # Channels-last on CPU at fp32 too: torch's CPU max-pool over NCHW took ~90x as long
            # as over NHWC (170 ms vs 1.9 ms for 80x64x28x28, 1 thread), a third of the step in a
            # profile; oneDNN convolutions are no slower in NHWC. The 4-D weights go to the
            # convolutions as channels-last copies (differentiable, a few KB), so activations are
            # NHWC from the first layer on, while the module and its stored parameters keep their
            # layout. The grouped batch norm works in whichever layout it is given.
            # `.to`, not `.contiguous`: a 1-channel tensor is "contiguous" in both layouts, and
            # oneDNN picks the output layout from the strides as written.
            x = x.to(memory_format=torch.channels_last)
            body = {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v
                    for k, v in body.items()}
        with grouped_context_statistics(self.backbone, t, s):
            flat = functional_call(self.backbone, body, (x,)).float()  # (T * (S+Q), D)
        z = flat.view(t, -1, self.embedding_dim)  # (T, S+Q, D)
        zs, zq = z[:, :s], z[:, s:]
        if self.cfg.first_order:
            zs = zs.detach()
        g = F.one_hot(ys, n_way).float() - 1.0 / n_way  # (T, S, n): minus the loss gradient
        w = self.inner_lr(HEAD_W) * torch.einsum("tsn,tsd->tnd", g, zs) / s  # (T, n, D)
        b = self.inner_lr(HEAD_B) * g.sum(1) / s  # (T, n)
        logits = torch.einsum("tqd,tnd->tqn", zq, w) + b[:, None, :]  # (T, Q, n)
        loss = F.cross_entropy(logits.reshape(-1, n_way), yq.reshape(-1))
        return loss, logits, flat, x

    def closed_form_chunk(self) -> int:
        """Tasks per batched pass: the whole meta-batch on a GPU; a few on a CPU, where the
        activations of a small chunk stay in cache (measured in benchmarks/bench_maml.py)."""
        return 1_000_000 if self.device.type == "cuda" else CPU_CLOSED_FORM_CHUNK

    def micro_batches(self, batch: Batch) -> list[Batch]:
        """Chunks of the closed-form pass (see `closed_form_chunk`), else one task at a time
        (the per-task graph of an inner loop is large)."""
        episodes = as_meta_batch(batch)
        size = self.closed_form_chunk() if self._closed_form_ok(episodes) else 1
        return [episodes[i : i + size] for i in range(0, len(episodes), size)]

    def compute(self, batch: Batch) -> LearnerOutput:
        """Mean query loss over the meta-batch, all tasks in one batched pass in closed form when
        there is one inner step (see _closed_form_meta_loss), else task by task."""
        episodes = as_meta_batch(batch)
        self.train()
        with self.autocast():
            if self._closed_form_ok(episodes):
                loss, logits, z, x = self._closed_form_meta_loss(episodes)
                yq = torch.stack([e.query_y for e in episodes]).to(logits.device)
                acc = (logits.detach().argmax(-1) == yq).float().mean()
                return LearnerOutput({"loss": loss, "task": loss.detach(), "acc": acc}, images=x,
                                     embeddings=z, episodes=episodes, episode_logits=list(logits))
            pairs = [self.meta_loss(ep) for ep in episodes]
        losses, logits_list = [p[0] for p in pairs], [p[1] for p in pairs]
        return LearnerOutput(episode_terms(losses, logits_list, episodes), episodes=episodes,
                             episode_logits=logits_list)

    def _fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> GradientLearner:
        """Adapt fast weights to the support set (eval_inner_steps steps) and keep them."""
        xs, ys = self.prep(support_x), support_y.to(self.device)
        with torch.enable_grad(), self.autocast():
            params = {**self.body_params(), **self.zero_head(n_way, xs)}
            params = self.adapt(params, xs, ys, self.cfg.eval_inner_steps, create_graph=False)
        self._fitted = ({k: v.detach() for k, v in params.items()}, xs)
        return self

    def forward(self, query_x: Tensor) -> Tensor:
        """Query images (n_query, C, H, W) -> logits (n_query, n_way) with the fitted fast weights."""
        if self._fitted is None:
            raise ConfigError(
                f"{type(self).__name__}.forward called before fit(support_x, support_y, n_way)"
            )
        params, xs = self._fitted
        with self.autocast():
            return self.query_logits(params, xs, self.prep(query_x))


class MAML(GradientLearner):
    """MAML: adapt every backbone parameter and the zero head; second order unless first_order."""

    name = "maml"
    Config = MAMLConfig


class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017, section 5.2): the outer gradient ignores inner Hessians."""

    name = "fomaml"

    def __init__(self, backbone: Backbone, **kwargs: object) -> None:
        if kwargs.get("first_order") is False:
            raise ConfigError("fomaml is first order by definition; use learner 'maml' for second order")
        super().__init__(backbone, **{**kwargs, "first_order": True})


class ANIL(MAML):
    """ANIL (Raghu et al. 2020): the inner loop adapts only the head; features are computed once."""

    name = "anil"

    def adapts(self, name: str) -> bool:
        return name.startswith("head.")

    def _features(self, xs: Tensor, xq: Tensor) -> tuple[Tensor, Tensor]:
        body = self.body_params()
        if self.cfg.transductive:
            return self.embed(body, xs, xs.shape[0]), self.embed(body, xq, xq.shape[0])
        z = self.embed(body, torch.cat([xs, xq]), xs.shape[0])
        return z[: xs.shape[0]], z[xs.shape[0] :]

    def adapt_head(
        self, head: Params, zs: Tensor, ys: Tensor, steps: int, create_graph: bool
    ) -> Params:
        for _ in range(steps):
            head = self.inner_update(head, F.cross_entropy(self.head(head, zs), ys), create_graph)
        return head

    def meta_loss(self, episode: Episode) -> tuple[Tensor, Tensor]:
        xs, ys, xq, yq = self._tensors(episode)
        zs, zq = self._features(xs, xq)
        steps = self.cfg.inner_steps if self.training else self.cfg.eval_inner_steps
        create_graph = self.training and not self.cfg.first_order
        head = self.adapt_head(self.zero_head(episode.n_way, xs), zs, ys, steps, create_graph)
        logits = self.head(head, zq)
        return F.cross_entropy(logits, yq), logits

    def _fit(self, support_x: Tensor, support_y: Tensor, n_way: int) -> ANIL:
        xs, ys = self.prep(support_x), support_y.to(self.device)
        with torch.no_grad(), self.autocast():
            zs = self.embed(self.body_params(), xs, xs.shape[0]).float()
        with torch.enable_grad():
            head = self.adapt_head(
                self.zero_head(n_way, xs), zs, ys, self.cfg.eval_inner_steps, False
            )
        self._fitted = ({**self.body_params(), **{k: v.detach() for k, v in head.items()}}, xs)
        return self


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): a learnable inner learning rate for every parameter element.

    Backbone rates have the parameter's shape; the per-task head gets a rate per feature (1, D)
    for its weight and a scalar for its bias, shared across classes because labels are arbitrary.
    """

    name = "metasgd"

    def __init__(self, backbone: Backbone, **kwargs: object) -> None:
        super().__init__(backbone, **kwargs)
        lr = self.cfg.inner_lr
        rates = {
            k.replace(".", "/"): nn.Parameter(torch.full_like(p, lr))
            for k, p in self.body_params().items()
        }
        rates[HEAD_W.replace(".", "/")] = nn.Parameter(torch.full((1, self.embedding_dim), lr))
        rates[HEAD_B.replace(".", "/")] = nn.Parameter(torch.full((1,), lr))
        self.inner_lrs = nn.ParameterDict(rates)

    def inner_lr(self, name: str) -> Tensor | float:
        return self.inner_lrs[name.replace(".", "/")]
