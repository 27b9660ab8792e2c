"""Batch norm that can take its statistics from chosen rows of the batch ("MetaBN").

`EpisodicBatchNorm2d` is a drop-in `nn.BatchNorm2d` (same parameters, buffers and state_dict).
Inside `context_statistics(model, n_rows)` every such layer normalises the whole batch with the
mean and (biased) variance of its first `n_rows` rows only, differentiably, and leaves the running
statistics untouched. Gradient-based few-shot learners put the support set first, so support
images are normalised exactly as in training mode and each query is normalised with support
statistics: predictions are inductive (no query sees another query) whatever `model.training` is.
This is "MetaBN" in Bronskill et al., "TaskNorm: Rethinking Batch Normalization for
Meta-Learning", ICML 2020.

Outside the context the layer is an ordinary BatchNorm2d, so exported graphs are unaffected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fewshot.errors import ConfigError


class EpisodicBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d; `context_rows = n` makes it normalise with statistics of rows [:n]."""

    context_rows: int | None = None
    context_groups: int | None = None  # with context_rows: the batch is this many tasks, each of
    # equal size with its own first `context_rows` rows as context (one batched pass for a meta-batch)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, C, H, W)
        n = self.context_rows
        if n is not None and self.context_groups is not None:
            return self._grouped(x, self.context_groups, n)
        if n is None:
            return super().forward(x)
        if (
            n >= x.shape[0]
        ):  # all rows are context: native batch-statistics kernel, no running update
            return nn.functional.batch_norm(
                x, None, None, self.weight, self.bias, True, 0.0, self.eps
            )
        scale, shift = self._affine(x[:n].float(), dims=(0, 2, 3))  # (C,) each
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]

    def _affine(self, ctx: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift) that normalise with `ctx`'s statistics over `dims`, then
        apply the layer's weight and bias: y = x * scale + shift."""
        mean = ctx.mean(dim=dims)
        var = ctx.var(dim=dims, unbiased=False)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift


    def _grouped(self, x: Tensor, groups: int, n: int) -> Tensor:
        """x: (groups * M, C, H, W); rows [g*M, g*M + n) are task g's context."""
        if self.weight is not None and self.bias is not None and x.dim() == 4:
            return GroupedContextNorm.apply(x, self.weight, self.bias, groups, n, self.eps)
        xv = x.view(groups, x.shape[0] // groups, *x.shape[1:])  # (T, M, C, H, W)
        scale, shift = self._affine(xv[:, :n].float(), dims=(1, 3, 4))  # (T, C) each
        out = xv * scale.to(x.dtype)[:, None, :, None, None] + shift.to(x.dtype)[:, None, :, None, None]
        return out.reshape(x.shape)


def _task_view(x: Tensor, groups: int, n: int) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Views of (T * M, C, H, W) `x`, no copy: the whole batch and each task's first `n` rows,
    as (T, M*H*W, C) for channels-last memory or (T, M, C, H*W) for NCHW, and the dims that a
    per-(task, channel) statistic reduces over."""
    t, (_, c, h, w) = groups, x.shape
    if x.is_contiguous():
        xg = x.view(t, -1, c, h * w)  # (T, M, C, HW)
        return xg, xg[:, :n], (1, 3)
    xg = x.permute(0, 2, 3, 1).view(t, -1, c)  # (T, M*H*W, C): channels-last memory
    return xg, xg[:, : n * h * w], (1,)


def _from_task_view(yg: Tensor, like: Tensor) -> Tensor:
    """Inverse of `_task_view` for a tensor laid out as `like`'s view."""
    n, c, h, w = like.shape
    if like.is_contiguous():
        return yg.view(n, c, h, w)
    return yg.view(n, h, w, c).permute(0, 3, 1, 2)


class GroupedContextNorm(torch.autograd.Function):
    """Batch norm of T equal tasks laid end to end, each normalised with the mean and biased
    variance of its own first `n` rows, then the shared affine (weight, bias): the same function
    as `_affine` applied task by task, in one pass over the batch in its own memory layout
    (NCHW or channels-last; no copies between layouts), with the backward written out as
    PyTorch's native batch-norm backward is (two reductions and one fused elementwise pass
    instead of autograd's chain of broadcasts, slice backward and zero fills).

    Backward, per task t and channel c, with g = weight * invstd, S1 = sum(dy), S2 = sum(dy * (x - mean))
    over the task's rows: dweight = sum_t invstd * S2, dbias = sum_t S1, and
    dx = g * dy on every row, plus (-g * S1 - 2 * dvar * mean) / N_ctx + x * 2 * dvar / N_ctx on
    the context rows, where dvar = -weight * S2 * invstd^3 / 2 and N_ctx = n * H * W.
    First-order only (the closed-form MAML step never differentiates it twice).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, groups: int, n: int, eps: float
    ) -> Tensor:
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        xg, xc, dims = _task_view(x, groups, n)
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 (fp64 for fp64)
        var, mean = torch.var_mean(xc.to(acc), dim=dims, unbiased=False, keepdim=True)
        invstd = torch.rsqrt(var + eps)  # (T, 1, C[, 1])
        shape = [1] * xg.dim()
        shape[2 if len(dims) == 2 else -1] = -1
        w, b = weight.to(acc).view(shape), bias.to(acc).view(shape)
        scale = invstd * w
        shift = b - mean * scale
        yg = torch.addcmul(shift.to(x.dtype), xg, scale.to(x.dtype))
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.groups, ctx.n, ctx.dims, ctx.shape = groups, n, dims, shape
        return _from_task_view(yg, x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        dims, n = ctx.dims, ctx.n
        fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        dy = dy.contiguous(memory_format=fmt)
        xg, xc, _ = _task_view(x, ctx.groups, n)
        dyg, _, _ = _task_view(dy, ctx.groups, n)
        acc = mean.dtype
        s1 = dyg.sum(dim=dims, keepdim=True, dtype=acc)
        s2 = (dyg * xg).sum(dim=dims, keepdim=True, dtype=acc) - mean * s1
        w = weight.to(acc).view(ctx.shape)
        g = w * invstd
        n_ctx = xc.numel() // (xc.shape[0] * x.shape[1])
        dvar2 = -w * s2 * invstd.pow(3) / n_ctx  # 2 * dvar / N_ctx
        dx = dyg * g.to(dy.dtype)
        dx_ctx = dx[:, : xc.shape[1]]
        dx_ctx.addcmul_(xc, dvar2.to(dy.dtype)).add_(((-g * s1 - dvar2 * mean * n_ctx) / n_ctx).to(dy.dtype))
        red = (0, *dims)
        dweight = (invstd * s2).sum(dim=red).to(weight.dtype)
        dbias = s1.sum(dim=red).to(weight.dtype)
        return _from_task_view(dx, x), dweight, dbias, None, None, None


def episodic_norms(model: nn.Module) -> list[EpisodicBatchNorm2d]:
    """The model's EpisodicBatchNorm2d layers; raises if it has plain batch-norm layers instead."""
    plain = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, EpisodicBatchNorm2d)
    ]
    if plain:
        raise ConfigError(
            f"layers {plain[:3]} are plain batch norm; gradient-based learners need "
            "fewshot.backbones.norm.EpisodicBatchNorm2d for inductive statistics (use it in the backbone)"
        )
    return [m for m in model.modules() if isinstance(m, EpisodicBatchNorm2d)]


@contextlib.contextmanager
def grouped_context_statistics(model: nn.Module, n_groups: int, n_rows: int) -> Iterator[None]:
    """Like `context_statistics` for a batch of `n_groups` equal-sized tasks laid end to end:
    each task is normalised with the statistics of its own first `n_rows` rows."""
    layers = episodic_norms(model)
    for m in layers:
        m.context_rows, m.context_groups = n_rows, n_groups
    try:
        yield
    finally:
        for m in layers:
            m.context_rows, m.context_groups = None, None


@contextlib.contextmanager
def context_statistics(model: nn.Module, n_rows: int) -> Iterator[None]:
    """Within the block, batch norm in `model` uses statistics of the first `n_rows` rows."""
    if n_rows < 1:
        raise ConfigError(f"context_statistics needs at least one row; got n_rows={n_rows}")
    layers = episodic_norms(model)
    for m in layers:
        m.context_rows = n_rows
    try:
        yield
    finally:
        for m in layers:
            m.context_rows = None
