"""ONNX export through `torch.export` (`torch.onnx.export(..., dynamo=True)`) and the parity check.

The exported graph takes float32 images (batch, C, H, W) in [0, 1] named `images` and returns
`embeddings` (batch, D); the batch dimension is dynamic.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fewshot.artifacts.embedders import ONNX_INPUT, ONNX_OUTPUT, OnnxEmbedder, TorchEmbedder
from fewshot.data.imageio import to_float
from fewshot.errors import CheckpointError

PARITY_TOLERANCE = 1e-4
MAX_BATCH = 4096


class ParityError(CheckpointError):
    """ONNX Runtime and PyTorch disagree on the same images."""


def export_onnx(backbone: nn.Module, path: Path, *, channels: int, size: int) -> Path:
    """Write `backbone` (in eval mode) to `path` as a single self-contained ONNX file."""
    backbone = backbone.eval()
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            backbone, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: batch},), optimize=True, verbose=False,
        )
    if program is None:
        raise CheckpointError("torch.onnx.export returned no program; upgrade torch/onnxscript")
    program.save(str(path), external_data=False)
    return path


def parity_batches(sample_images: np.ndarray, *, large: int = 16) -> list[np.ndarray]:
    """Batch 1 and a larger batch (up to `large`, tiled from the samples when there are fewer)."""
    if sample_images.ndim != 4 or sample_images.dtype != np.uint8 or len(sample_images) == 0:
        raise ValueError(
            f"sample_images must be uint8 (N, C, H, W) with N >= 1 real images; got "
            f"{sample_images.dtype} {tuple(sample_images.shape)}"
        )
    reps = -(-large // len(sample_images))
    big = np.concatenate([sample_images] * reps)[:large]
    return [sample_images[:1], big]


def max_abs_diff(a: TorchEmbedder | OnnxEmbedder, b: TorchEmbedder | OnnxEmbedder, batches: list[np.ndarray]) -> float:
    """Largest |a - b| over all batches."""
    return max(float(np.abs(a.embed(x) - b.embed(x)).max()) for x in batches)


def check_parity(
    torch_embedder: TorchEmbedder, onnx_embedder: OnnxEmbedder, sample_images: np.ndarray,
    *, tolerance: float = PARITY_TOLERANCE,
) -> float:
    """Max abs difference between runtimes on batch 1 and a larger batch; raise above `tolerance`."""
    diff = max_abs_diff(torch_embedder, onnx_embedder, parity_batches(sample_images))
    if not np.isfinite(diff) or diff > tolerance:
        raise ParityError(
            f"ONNX Runtime and PyTorch embeddings differ by {diff:.3g} (tolerance {tolerance:g}); "
            "the ONNX graph does not match the weights: re-export the bundle, and check the backbone "
            "has no data-dependent control flow or train-mode layers"
        )
    return diff


def expected_outputs(torch_embedder: TorchEmbedder, sample_images: np.ndarray) -> np.ndarray:
    """Reference embeddings stored with the bundle so a loaded bundle can re-check itself."""
    return torch_embedder.embed(sample_images)


__all__ = [
    "PARITY_TOLERANCE", "ParityError", "check_parity", "expected_outputs", "export_onnx",
    "max_abs_diff", "parity_batches", "to_float",
]
