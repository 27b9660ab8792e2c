"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four [conv3x3-BN-ReLU-maxpool2] blocks of 64 channels.

`width` scales the channel count (0.5 -> 32 channels: a fast student; 2.0 -> 128: a teacher).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fewshot.backbones.base import Backbone
from fewshot.backbones.norm import EpisodicBatchNorm2d
from fewshot.errors import ConfigError


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3 -> BN -> max-pool 2 -> ReLU: the same function and gradients as the paper's
    conv-BN-ReLU-pool, since relu(max(x)) == max(relu(x)); pooling first makes the ReLU (forward
    and backward) touch a quarter of the elements. The ReLU runs in place: max-pool's backward
    needs only its input and indices, never its output. Indices 0 (conv) and 1 (BN) are the
    parameter names of every stored Conv-4 ("encoder.<block>.0.weight"), so checkpoints load."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        EpisodicBatchNorm2d(c_out),
        nn.MaxPool2d(2),
        nn.ReLU(inplace=True),
    )


class Conv4(Backbone):
    """(N, C, H, W) -> (N, hidden * (H // 16) * (W // 16)); 28x28 Omniglot gives 64-d embeddings."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        hidden: int = 64,
        depth: int = 4,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if image_size < 2**depth:
            raise ConfigError(f"image_size {image_size} is smaller than 2**depth = {2**depth}")
        if width <= 0:
            raise ConfigError(f"width must be > 0; got {width} (1.0 = {hidden} channels)")
        channels = max(1, round(hidden * width))
        chans = [in_channels] + [channels] * depth
        self.encoder = nn.Sequential(*[conv_block(a, b) for a, b in zip(chans[:-1], chans[1:])])
        side = image_size
        for _ in range(depth):
            side //= 2
        self.embedding_dim = channels * side * side
        self.config: dict[str, Any] = {
            "name": "conv4",
            "in_channels": in_channels,
            "image_size": image_size,
            "hidden": hidden,
            "depth": depth,
            "width": width,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).flatten(1)
