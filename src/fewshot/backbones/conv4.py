"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four [conv3x3-BN-ReLU-maxpool2] blocks of 64 channels.

`width` scales the channel count (0.5 -> 32 channels: a fast student; 2.0 -> 128: a teacher).
`pool_last=False, global_pool=True` is RFS's ConvNet (Tian et al. 2020, `models/convnet.py`): the
last block keeps its resolution and the map is averaged into a `channels`-d embedding (10x10 ->
64-d at 84 px) instead of pooled and flattened (5x5x64 = 1600-d), which ties every feature to a
position in the picture.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fewshot.backbones.base import Backbone
from fewshot.backbones.norm import EpisodicBatchNorm2d
from fewshot.errors import ConfigError


def conv_block(c_in: int, c_out: int, pool: bool = True) -> nn.Sequential:
    """conv3x3 -> BN -> max-pool 2 -> ReLU: the same function and gradients as the paper's
    conv-BN-ReLU-pool, since relu(max(x)) == max(relu(x)); pooling first makes the ReLU (forward
    and backward) touch a quarter of the elements. The ReLU runs in place: max-pool's backward
    needs only its input and indices, never its output. Indices 0 (conv) and 1 (BN) are the
    parameter names of every stored Conv-4 ("encoder.<block>.0.weight"), so checkpoints load.
    `pool=False`: conv3x3 -> BN -> ReLU, the resolution kept."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), EpisodicBatchNorm2d(c_out)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Conv4(Backbone):
    """(N, C, H, W) -> (N, channels * h * w): channels = round(hidden * width), and h, w are H, W
    halved (floored) once per pooled block (every block; all but the last with `pool_last=False`).
    28x28 Omniglot gives 64-d embeddings, 84x84 miniImageNet 1600-d. With `global_pool`:
    (N, channels), the last map averaged over its positions."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        hidden: int = 64,
        depth: int = 4,
        width: float = 1.0,
        pool_last: bool = True,
        global_pool: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 2**depth:
            raise ConfigError(f"image_size {image_size} is smaller than 2**depth = {2**depth}")
        if width <= 0:
            raise ConfigError(f"width must be > 0; got {width} (1.0 = {hidden} channels)")
        channels = max(1, round(hidden * width))
        chans = [in_channels] + [channels] * depth
        pools = [True] * (depth - 1) + [pool_last]
        self.encoder = nn.Sequential(*[conv_block(a, b, p) for a, b, p in zip(chans[:-1], chans[1:], pools)])
        side = image_size
        for _ in range(sum(pools)):
            side //= 2
        self.global_pool = global_pool
        self.embedding_dim = channels if global_pool else channels * side * side
        self.config: dict[str, Any] = {
            "name": "conv4",
            "in_channels": in_channels,
            "image_size": image_size,
            "hidden": hidden,
            "depth": depth,
            "width": width,
        }
        # recorded only when not the default, so every Conv-4 saved before they existed keeps its config
        if not pool_last:
            self.config["pool_last"] = False
        if global_pool:
            self.config["global_pool"] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return z.mean((2, 3)) if self.global_pool else z.flatten(1)
