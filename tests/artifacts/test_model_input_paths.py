"""One image, one model input: episode tensors (training / evaluation), the bundle's embedders
(PyTorch and ONNX Runtime) and the service's upload decoding all give the model the same numbers
under a preprocessing with mean / std and a centre crop."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from fewshot.artifacts.embedders import ONNX_INPUT, ONNX_OUTPUT, OnnxEmbedder, TorchEmbedder
from fewshot.data.cache import ClassInfo, PackedCache, write_cache
from fewshot.data.imageio import Preprocessing, decode_image
from fewshot.episodes.batches import sample_batch
from fewshot.episodes.materialise import materialise, pool_from_split
from fewshot.episodes.sampling import EpisodeSpec, describe_episode, episode_rng
from fewshot.service.images import decode_upload

PRE = Preprocessing("RGB", 4, "bicubic", crop=0.8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
# a solid (200, 100, 50) photo: (200/255 - 0.5) / 0.2, (100/255 - 0.4) / 0.25, (50/255 - 0.3) / 0.5
EXPECTED = np.array([1.4215686, -0.0313725, -0.2078431], dtype=np.float32)


class Echo(nn.Module):
    """The model input itself as the embedding: (N, C, H, W) -> (N, C*H*W)."""

    embedding_dim = 3 * 4 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * 1.0


class _Split:
    name = "train"
    class_ids = np.arange(2)
    rotations = np.zeros(2, dtype=np.int64)


def echo_onnx(path: Path) -> Path:
    """The same echo as an ONNX graph (one Flatten node), written without a slow torch export."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", [ONNX_INPUT], [ONNX_OUTPUT], axis=1)], "echo",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["N", 48])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


def test_episodes_embedders_and_service_give_the_model_the_same_input(tmp_path: Path) -> None:
    data = photo()
    img = decode_image(data, PRE)
    classes = [ClassInfo("a", "d", "", 0, 2), ClassInfo("b", "d", "", 2, 2)]
    write_cache(tmp_path / "c", np.stack([img] * 4), classes, [f"{i}.png" for i in range(4)], PRE, "fp")
    cache = PackedCache.open(tmp_path / "c")
    pool = pool_from_split(cache, _Split())
    episode = materialise(cache, describe_episode(pool, EpisodeSpec(2, 1, 1), episode_rng(0, 0)))
    batch_x, _ = sample_batch(cache, pool, 3, seed=0, index=0)

    upload = decode_upload(data, PRE, max_pixels=10_000, thumbnail_size=16, name="x.png", thumbnail=False).array
    torch_in = TorchEmbedder(Echo(), PRE).embed(upload[None])
    onnx_in = OnnxEmbedder(echo_onnx(tmp_path / "echo.onnx"), PRE, embedding_dim=48).embed(upload[None])

    want = np.broadcast_to(EXPECTED[:, None, None], (3, 4, 4)).reshape(1, -1)
    for got in (episode.support_x.flatten(1).numpy(), episode.query_x.flatten(1).numpy(),
                batch_x.flatten(1).numpy(), torch_in, onnx_in):
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=1e-6)
