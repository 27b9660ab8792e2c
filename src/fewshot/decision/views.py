"""Example views: how a taught image becomes the embedding its class keeps.

A class is remembered by the embeddings of its examples (`fewshot.decision.memory`). With views, an
example's embedding is the mean of the embeddings of a few fixed views of the image instead of the
image's own, so a class taught with one drawing is also taught where that drawing sits a pixel or
two off centre (test-time augmentation of the support set; RFS, Tian et al. 2020, fits its probe on
augmented support copies). Queries are never viewed: they are embedded as they come.

    none            the image                                                              1 view
    mirror          the image and its left-right mirror (photos; a mirrored letter can be   2 views
                    another letter)
    shift4          the image and the 4 corner crops of the image edge-padded by `shift`     5 views
                    pixels (shifts of +-shift pixels in both directions)
    shift4+mirror   the 5 of shift4 and the mirror of each                                 10 views

Views are deterministic (a stored example is the same embedding whenever it is embedded) and are
averaged into one row per image, so a class still holds one row per example (its count, spread
and stored thumbnails stay per image). For a nearest-prototype head the class mean of the averaged
rows is exactly the mean over every view of every example. A probe head is fitted on the averaged
rows (`benchmarks/support_views.py` measured the probe on views kept as separate rows too, which is
not what is served).

`DecisionRule.views` / `DecisionRule.view_shift` name the views a bundle serves (chosen on
validation classes at export: `fewshot.artifacts.export.choose_views`). The paths that turn taught
images into class memory for a bundle call `example_embeddings`: the service's registration,
export's, quantisation's and the zoo's measurement as served, and export's open-set calibration;
a bundle teacher in distillation calls `example_embeddings_torch` on its model-input tensors. The
photos and bring-your-own bundles serve no views (their calibration assumes none).

Stored rows are view means, so what the service computes from stored rows alone (the insight
panel's held-out answers, the adapted head's held-out choice) answers held-out examples as view
means, not as plain queries: slightly optimistic for both the prototypes and the head it compares.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from fewshot.errors import ConfigError

Views = Literal["none", "mirror", "shift4", "shift4+mirror"]
VIEWS: tuple[Views, ...] = ("none", "mirror", "shift4", "shift4+mirror")
VIEW_COUNT: dict[str, int] = {"none": 1, "mirror": 2, "shift4": 5, "shift4+mirror": 10}
A = TypeVar("A", np.ndarray, torch.Tensor)


def check_views(views: str, shift: int) -> Views:
    """`views` if it is known and its shift fits it (>= 1 pixel for the shifted views)."""
    if views not in VIEWS:
        raise ConfigError(f"example views {views!r} are unknown; use one of {list(VIEWS)}")
    if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
        raise ConfigError(f"view shift {shift!r} must be a whole number of pixels >= 0")
    if views.startswith("shift") and shift < 1:
        raise ConfigError(f"example views {views!r} need a shift of at least 1 pixel; got {shift}. Pass "
                          "view_shift (default_shift(image size) gives 2 at 28 px, 6 at 84 px)")
    return views  # type: ignore[return-value]


def default_shift(size: int) -> int:
    """The shift of the shifted views for images of `size` pixels: about 7% of the side, at least 1
    (2 at 28 px, 6 at 84 px, 16 at 224 px)."""
    return max(1, round(size / 14))


def _mirror(x: A) -> A:
    if isinstance(x, torch.Tensor):
        return x.flip(-1)
    return np.ascontiguousarray(x[..., ::-1])


def _shifted(x: A, pad: int) -> list[A]:
    """The 4 corner crops of `x` (N, C, H, W) edge-padded by `pad` pixels on every side."""
    h, w = x.shape[-2], x.shape[-1]
    if isinstance(x, torch.Tensor):
        p = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        return [p[..., y:y + h, c:c + w].contiguous() for y in (0, 2 * pad) for c in (0, 2 * pad)]
    q = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="edge")
    return [np.ascontiguousarray(q[..., y:y + h, c:c + w]) for y in (0, 2 * pad) for c in (0, 2 * pad)]


def view_images(x: A, views: str, shift: int) -> list[A]:
    """The views of a batch of images `x` (N, C, H, W), uint8 pixels or model-input tensors (edge
    padding is the same before or after per-channel normalisation), the image itself first."""
    views = check_views(views, shift)
    if x.ndim != 4:
        raise ValueError(f"views take a batch of images (N, C, H, W); got shape {tuple(x.shape)}")
    if views.startswith("shift") and 2 * shift >= min(x.shape[-2], x.shape[-1]):
        raise ConfigError(f"a view shift of {shift} pixels is too large for {x.shape[-2]}x{x.shape[-1]} images; "
                          "use less than half the side (default_shift(size))")
    base: list[A] = [x]
    if views.startswith("shift4"):
        base += _shifted(x, shift)
    if views == "mirror" or views.endswith("+mirror"):
        base += [_mirror(b) for b in base]
    return base


def example_embeddings(embed: Callable[[np.ndarray], np.ndarray], images: np.ndarray, views: str,
                       shift: int) -> np.ndarray:
    """(N, D) float32: the embedding each taught image contributes to its class, the mean over its
    views (module doc) of `embed` (uint8 (M, C, H, W) -> (M, D)), all views in one call."""
    vs = view_images(images, views, shift)
    if len(vs) == 1 or len(images) == 0:
        return np.asarray(embed(images), np.float32)
    z = np.asarray(embed(np.concatenate(vs)))
    return z.reshape(len(vs), len(images), -1).mean(0, dtype=np.float64).astype(np.float32)


def example_embeddings_torch(embed: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, views: str,
                             shift: int) -> torch.Tensor:
    """`example_embeddings` for model-input tensors (a distillation teacher's episodes)."""
    vs = view_images(x, views, shift)
    if len(vs) == 1 or x.shape[0] == 0:
        return embed(x)
    z = embed(torch.cat(vs))
    return z.reshape(len(vs), x.shape[0], -1).mean(0)
