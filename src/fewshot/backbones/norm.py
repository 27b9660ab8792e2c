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

import torch
from torch import Tensor, nn

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
        xv = x.view(groups, x.shape[0] // groups, *x.shape[1:])  # (T, M, C, H, W)
        scale, shift = self._affine(xv[:, :n].float(), dims=(1, 3, 4))  # (T, C) each
        out = xv * scale.to(x.dtype)[:, None, :, None, None] + shift.to(x.dtype)[:, None, :, None, None]
        return out.reshape(x.shape)


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
