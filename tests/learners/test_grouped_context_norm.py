"""GroupedContextNorm (the closed-form MAML path's batch norm: T tasks in one pass, each normalised
with its own support rows, hand-written backward) against autograd through the per-task layer."""

from __future__ import annotations

import pytest
import torch

from fewshot.backbones.norm import EpisodicBatchNorm2d, GroupedContextNorm, context_statistics

T, M, N_CTX, C, H, W = 3, 5, 2, 4, 3, 3
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def inputs(dtype: torch.dtype, layout: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(T * M, C, H, W, generator=g, dtype=dtype) * 2 + 1).to(memory_format=layout)
    weight = torch.rand(C, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(C, generator=g, dtype=dtype)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(layout: torch.memory_format) -> None:
    x, w, b = inputs(torch.float64, layout)
    assert torch.autograd.gradcheck(lambda x, w, b: GroupedContextNorm.apply(x, w, b, T, N_CTX, 1e-5), (x, w, b))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_per_task_layer(layout: torch.memory_format) -> None:
    """Same outputs and gradients as the layer run task by task with autograd (fp32)."""
    x, w, b = inputs(torch.float32, layout)
    dy = torch.randn(T * M, C, H, W, generator=torch.Generator().manual_seed(1))
    y = GroupedContextNorm.apply(x, w, b, T, N_CTX, 1e-5)
    assert y.is_contiguous(memory_format=layout)  # no copy into another layout
    fast = torch.autograd.grad(y, (x, w, b), dy)

    bn = EpisodicBatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    x2 = x.detach().contiguous().requires_grad_()
    with context_statistics(bn, N_CTX):
        y2 = torch.cat([bn(task) for task in x2.split(M)])
    ref = torch.autograd.grad(y2, (x2, bn.weight, bn.bias), dy)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def test_second_derivative_is_refused() -> None:
    x, w, b = inputs(torch.float64, torch.contiguous_format)
    (gx,) = torch.autograd.grad(GroupedContextNorm.apply(x, w, b, T, N_CTX, 1e-5).pow(2).sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
