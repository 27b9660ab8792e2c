"""A small Inception (GoogLeNet) network for 28-84 px images (Szegedy et al., "Going Deeper with
Convolutions", CVPR 2015, arXiv:1409.4842; 5x5 branch as two 3x3 convolutions, Szegedy et al. 2016,
arXiv:1512.00567).

stem [conv3x3-BN-ReLU x2, maxpool2] -> Inception x2 -> maxpool2 -> Inception x2 -> global average
pool. Each Inception module concatenates four branches: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | maxpool3x3-1x1.
All widths scale with `width`; D = 320 * width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fewshot.backbones.base import Backbone
from fewshot.backbones.norm import EpisodicBatchNorm2d
from fewshot.errors import ConfigError

# per module: (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection)
MODULES = (
    (32, 32, 48, 16, 16, 16),
    (48, 48, 64, 24, 24, 24),
    (64, 64, 96, 32, 32, 32),
    (96, 96, 128, 48, 48, 48),
)


def cbr(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), EpisodicBatchNorm2d(c_out), nn.ReLU()
    )


class InceptionModule(nn.Module):
    """(N, c_in, H, W) -> (N, c1 + c3 + c5 + cp, H, W)."""

    def __init__(self, c_in: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.b1 = cbr(c_in, c1, 1)
        self.b3 = nn.Sequential(cbr(c_in, c3r, 1), cbr(c3r, c3, 3))
        self.b5 = nn.Sequential(cbr(c_in, c5r, 1), cbr(c5r, c5, 3), cbr(c5, c5, 3))
        self.bp = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), cbr(c_in, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


class InceptionNet(Backbone):
    """(N, C, H, W) -> (N, D) with D = sum of the last module's branches (320 at width 1)."""

    def __init__(self, *, in_channels: int, image_size: int, width: float = 1.0) -> None:
        super().__init__()
        if image_size < 8:
            raise ConfigError(f"InceptionNet halves the image twice; image_size {image_size} < 8")
        if width <= 0:
            raise ConfigError(f"width must be > 0; got {width}")

        def w(c: int) -> int:
            return max(1, round(c * width))

        self.stem = nn.Sequential(cbr(in_channels, w(32), 3), cbr(w(32), w(64), 3), nn.MaxPool2d(2))
        layers: list[nn.Module] = []
        c_in = w(64)
        for i, spec in enumerate(MODULES):
            if i == 2:
                layers.append(nn.MaxPool2d(2))
            module = InceptionModule(c_in, *(w(c) for c in spec))
            layers.append(module)
            c_in = module.out_channels
        self.features = nn.Sequential(*layers)
        self.embedding_dim = c_in
        self.config: dict[str, Any] = {
            "name": "inception",
            "in_channels": in_channels,
            "image_size": image_size,
            "width": width,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x)).mean(dim=(2, 3))  # (N, D, h, w) -> (N, D)
