"""Embedders: uint8 images (N, C, H, W) -> float32 embeddings (N, D), from PyTorch or ONNX Runtime.

Both take the same input (uint8, the output of `decode_image`) and apply the same conversion to
the model input (`model_input` under the bundle's `Preprocessing`: x / 255, then mean / std when
set), so the only difference between them is the runtime.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fewshot.backbones.base import Backbone
from fewshot.data.imageio import Preprocessing, model_input
from fewshot.errors import CheckpointError

ONNX_INPUT = "images"
ONNX_OUTPUT = "embeddings"


@runtime_checkable
class Embedder(Protocol):
    """images_u8 (N, C, H, W) uint8 -> (N, D) float32."""

    embedding_dim: int

    def embed(self, images_u8: np.ndarray) -> np.ndarray: ...


def check_batch(images_u8: np.ndarray, channels: int, size: int) -> None:
    """Refuse a batch that is not uint8 (N, channels, size, size), naming what was given."""
    if images_u8.dtype != np.uint8 or images_u8.ndim != 4 or images_u8.shape[1:] != (channels, size, size):
        raise ValueError(
            f"expected uint8 images of shape (N, {channels}, {size}, {size}); got "
            f"{images_u8.dtype} {tuple(images_u8.shape)}; decode with fewshot.data.imageio.decode_image"
        )


class MemoEmbed:
    """`embed` with every distinct image embedded once: an evaluation draws the same test images
    into thousands of episodes, and the embedding of an image does not depend on its episode (the
    served embedder is fixed; no batch statistics), up to float rounding that can differ with the
    size of the batch an image is first embedded in (a rare tie may flip; `fewshot.workflows.zoo.
    verify` allows 0.5 points). Images are keyed by a digest of their bytes, so a rotated or
    re-cropped image is a new image. Holds one (D,) float32 row per distinct image it has seen: at
    most the split's images (12,000 miniImageNet test images at 1600-d: 77 MB)."""

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        self._embed = embed
        self._rows: dict[bytes, np.ndarray] = {}
        self.embedded = 0  # images that went through `embed`

    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        if images_u8.dtype != np.uint8 or images_u8.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W); got {images_u8.dtype} {tuple(images_u8.shape)}")
        keys = [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest() for im in images_u8]
        missing = {k: i for i, k in enumerate(keys) if k not in self._rows}
        if missing:
            out = self._embed(images_u8[list(missing.values())])
            self.embedded += len(missing)
            for k, row in zip(missing, out):
                self._rows[k] = row
        return np.stack([self._rows[k] for k in keys]) if keys else self._embed(images_u8)


class TorchEmbedder:
    """Eager PyTorch in eval() mode, no autograd."""

    def __init__(self, backbone: Backbone, pre: Preprocessing) -> None:
        self.backbone = backbone.eval()
        self.pre = pre
        self.channels, self.size = pre.channels, pre.size
        self.embedding_dim = backbone.embedding_dim

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        check_batch(images_u8, self.channels, self.size)
        with torch.inference_mode():
            out = self.backbone(torch.from_numpy(model_input(images_u8, self.pre)))
        return out.numpy().astype(np.float32, copy=False)


def default_intra_op_threads() -> int:
    """One ORT thread per core, at most 2: batch-1 Conv-4 gains nothing from more, and concurrent
    requests already run on the other cores (FastAPI's thread pool calls `run` in parallel)."""
    return max(1, min(2, os.cpu_count() or 1))


class OnnxEmbedder:
    """ONNX Runtime CPU session; `run` is thread-safe, so one instance serves all requests."""

    def __init__(
        self, onnx_path: str | Path, pre: Preprocessing, *, embedding_dim: int,
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads or default_intra_op_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle ORT threads busy-wait by default; on a 2-core box that steals the CPU from the HTTP
        # server and from concurrent requests
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types for corrupt graphs
            raise CheckpointError(f"{onnx_path}: ONNX Runtime cannot load the model ({exc})") from exc
        self.pre, self.embedding_dim = pre, embedding_dim
        self.channels, self.size = pre.channels, pre.size

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        check_batch(images_u8, self.channels, self.size)
        (out,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: model_input(images_u8, self.pre)})
        return np.asarray(out, dtype=np.float32)
