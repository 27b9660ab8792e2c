"""ResNet-12 (Lee et al., "Meta-Learning with Differentiable Convex Optimization" (MetaOptNet),
CVPR 2019, arXiv:1904.03758; Tian et al. 2020, arXiv:2003.11539).

Four residual blocks; each is three [conv3x3-BN] layers with LeakyReLU(0.1) between them, a
[conv1x1-BN] shortcut, LeakyReLU after the sum and a 2x2 max-pool. Channels (64, 160, 320, 640)
scaled by `width`; global average pooling gives D = channels[-1]. DropBlock is left out.
Spatial sizes: 28 -> 14 -> 7 -> 3 -> 1; 32 -> 2; 84 -> 5 before pooling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fewshot.backbones.base import Backbone
from fewshot.backbones.norm import EpisodicBatchNorm2d
from fewshot.errors import ConfigError


def conv_bn(c_in: int, c_out: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), EpisodicBatchNorm2d(c_out)]


class ResBlock12(nn.Module):
    """(N, c_in, H, W) -> (N, c_out, H // 2, W // 2)."""

    def __init__(self, c_in: int, c_out: int, slope: float = 0.1) -> None:
        super().__init__()
        act = nn.LeakyReLU(slope)
        self.body = nn.Sequential(
            *conv_bn(c_in, c_out, 3), act, *conv_bn(c_out, c_out, 3), act, *conv_bn(c_out, c_out, 3)
        )
        self.shortcut = nn.Sequential(*conv_bn(c_in, c_out, 1))
        self.out = nn.Sequential(nn.LeakyReLU(slope), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(Backbone):
    """(N, C, H, W) -> (N, round(channels[-1] * width)); needs image_size >= 16."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        channels: tuple[int, ...] | list[int] = (64, 160, 320, 640),
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if image_size < 16:
            raise ConfigError(f"ResNet-12 halves the image 4 times; image_size {image_size} < 16")
        if width <= 0 or len(channels) != 4:
            raise ConfigError(
                f"ResNet-12 needs 4 channel counts and width > 0; got {list(channels)}, {width}"
            )
        widths = [max(1, round(c * width)) for c in channels]
        chans = [in_channels, *widths]
        self.blocks = nn.Sequential(*[ResBlock12(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.embedding_dim = widths[-1]
        self.config: dict[str, Any] = {
            "name": "resnet12",
            "in_channels": in_channels,
            "image_size": image_size,
            "channels": list(channels),
            "width": width,
        }

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator) -> None:
        """Kaiming-normal (fan-out, LeakyReLU 0.1) convolutions, as in the reference ResNet-12."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0.1, mode="fan_out", nonlinearity="leaky_relu",
                                        generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))  # (N, D, h, w) -> (N, D)
