"""Parameter initialisation from an explicit `torch.Generator` (no global seed).

`reset_parameters(module, generator)` re-draws every convolution and linear layer the way PyTorch's
own `reset_parameters` does (Kaiming-uniform weights with a = sqrt(5), biases uniform in
+-1/sqrt(fan_in)) but from `generator`, and resets normalisation layers to weight 1, bias 0 and
fresh running statistics; a module with an `init_parameters(generator)` method then applies its
own scheme. `built_quietly` constructs modules without advancing the global RNG.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


@contextlib.contextmanager
def built_quietly() -> Iterator[None]:
    """Construct modules inside this block: PyTorch's default initialisation draws from the
    global RNG; forking it keeps the process-wide state untouched (the draws are then replaced)."""
    with torch.random.fork_rng(devices=[]):
        yield


@torch.no_grad()
def reset_parameters(module: M, generator: torch.Generator) -> M:
    """Re-initialise `module` in place from `generator`; returns it."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            m.reset_parameters()
    for m in module.modules():  # architectures with their own scheme (e.g. ResNet-12) apply it
        custom = getattr(m, "init_parameters", None)
        if callable(custom):
            custom(generator)
    return module
