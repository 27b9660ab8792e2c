"""The training fast path: Conv-4's pool-before-ReLU block is the paper's block (same outputs,
gradients, running statistics and parameter names), and CPU policies keep freed memory for reuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fewshot import precision
from fewshot.backbones import create_backbone
from fewshot.backbones.norm import context_statistics
from fewshot.precision import FP32, PrecisionPolicy, autocast_context, prepare_model


def paper_order(net: nn.Module) -> nn.Module:
    """A copy of a Conv-4 with every block in the paper's order: conv -> BN -> ReLU -> max-pool."""
    ref = copy.deepcopy(net)
    for i, block in enumerate(ref.encoder):
        conv, bn = block[0], block[1]
        ref.encoder[i] = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(2))
    return ref


def grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 84)])
def test_conv4_blocks_equal_the_papers_conv_bn_relu_pool(channels, size):
    g = torch.Generator().manual_seed(0)
    net = create_backbone("conv4", in_channels=channels, image_size=size, width=0.25, generator=g)
    ref = paper_order(net)
    x = torch.randn(6, channels, size, size, generator=g)
    for model in (net, ref):
        model.train()
        model(x).square().sum().backward()
    torch.testing.assert_close(net(x), ref(x))
    for (k, a), b in zip(grads(net).items(), grads(ref).values()):
        torch.testing.assert_close(a, b, msg=k)
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):  # running statistics
        torch.testing.assert_close(a, b, msg=k)
    net.eval()
    ref.eval()
    torch.testing.assert_close(net(x), ref(x))
    with context_statistics(net, 2), context_statistics(ref, 2):
        torch.testing.assert_close(net(x), ref(x))


def test_conv4_bf16_channels_last_matches_the_papers_order():
    policy = PrecisionPolicy("bf16", True, "cpu")
    g = torch.Generator().manual_seed(1)
    net = create_backbone("conv4", in_channels=3, image_size=32, width=0.25, generator=g)
    ref = prepare_model(paper_order(net), policy)
    prepare_model(net, policy)
    x = torch.randn(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    with autocast_context(policy):
        torch.testing.assert_close(net(x), ref(x))


def test_conv4_parameter_names_are_those_of_stored_checkpoints():
    net = create_backbone("conv4", in_channels=1, image_size=28)
    names = {k.rsplit(".", 1)[0] for k in net.state_dict()}
    assert names == {f"encoder.{b}.{i}" for b in range(4) for i in (0, 1)}  # conv 0, BN 1


def test_only_the_training_commands_keep_freed_memory_and_the_environment_turns_it_off(monkeypatch):
    from fewshot.cli import commands as cli

    calls = []
    record = lambda: calls.append(1) or True  # noqa: E731
    monkeypatch.setattr(precision, "keep_freed_memory", record)
    monkeypatch.setattr(cli, "keep_freed_memory", record)  # the name the CLI module imported
    prepare_model(nn.Linear(2, 2), FP32)  # library code leaves the process's allocator alone
    prepare_model(nn.Linear(2, 2), PrecisionPolicy("bf16", True, "cpu"))
    assert calls == []
    cli._training_process()  # what `fewshot train | distill | tune | evaluate | pipeline` call first
    assert calls == [1]
    monkeypatch.undo()

    monkeypatch.setenv("FEWSHOT_KEEP_FREED_MEMORY", "0")
    precision.keep_freed_memory.cache_clear()
    try:
        assert precision.keep_freed_memory() is False
    finally:
        precision.keep_freed_memory.cache_clear()
