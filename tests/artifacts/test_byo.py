"""Bring your own ONNX feature extractor: small models exported here with the torch.export-based
exporter become bundles the service serves, and bad models are refused with the fix."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from fewshot.artifacts.bundle import load_bundle
from fewshot.artifacts.byo import OnnxModelError, bundle_from_onnx
from fewshot.cli import main
from fewshot.data.imageio import Preprocessing
from fewshot.errors import CheckpointError

SIZE = 16
RGB = Preprocessing("RGB", SIZE, resample="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}


class Pooled(nn.Module):
    """Conv -> ReLU -> global average pool -> flatten: (N, C, S, S) -> (N, 8)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class FeatureMap(Pooled):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))  # (N, 8, S, S): not an embedding


class Flat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * SIZE * SIZE, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 768) vectors, not images
        return self.fc(x)


def export(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.manual_seed(0)
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = ({0: batch},)
    program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=["pixels"],
                                output_names=["features"], verbose=False)
    assert program is not None
    program.save(str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("byo")
    torch.manual_seed(0)
    img = torch.rand(2, 3, SIZE, SIZE)
    return {"good": export(Pooled(), img, d / "good.onnx"), "feature_map": export(FeatureMap(), img, d / "fm.onnx"),
            "flat": export(Flat(), img.flatten(1), d / "flat.onnx")}


def coloured(colour: tuple[int, int, int], n: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, S, S): a colour with pixel noise."""
    rng = np.random.default_rng(seed)
    base = np.asarray(colour, np.int16).reshape(1, 3, 1, 1)
    return np.clip(base + rng.integers(-25, 26, (n, 3, SIZE, SIZE)), 0, 255).astype(np.uint8)


def labelled(n: int = 6) -> dict[str, np.ndarray]:
    return {name: coloured(c, n, k) for k, (name, c) in enumerate(COLOURS.items())}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from fewshot.service.app import create_app
    from fewshot.service.settings import ServiceSettings

    d = tmp_path_factory.mktemp("svc")
    bundle = bundle_from_onnx(models["good"], d / "bundle", preprocessing=RGB, labelled=labelled(),
                              calibration_episodes=20)
    with TestClient(create_app(ServiceSettings(bundle_path=str(bundle), db_url=str(d / "svc.db"),
                                               admin_key="admin"))) as c:
        yield c


def test_onnx_bundle_is_served_and_classifies(client: TestClient) -> None:
    r = client.post("/workspaces", json={"name": "colours"}, headers={"Authorization": "Bearer admin"})
    ws, auth = r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}
    ids = {}
    for k, (name, colour) in enumerate(COLOURS.items()):
        files = [("images", (f"{i}.png", png(a), "image/png")) for i, a in enumerate(coloured(colour, 4, 10 + k))]
        r = client.post(f"/workspaces/{ws}/classes", data={"label": name}, files=files, headers=auth)
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    queries = [(name, a) for k, (name, c) in enumerate(COLOURS.items()) for a in coloured(c, 2, 20 + k)]
    r = client.post(f"/workspaces/{ws}/classify", files=[("images", (f"q{i}.png", png(a), "image/png"))
                                                          for i, (_, a) in enumerate(queries)], headers=auth)
    assert r.status_code == 200, r.text
    assert [p["class_id"] for p in r.json()["predictions"]] == [ids[name] for name, _ in queries]


def test_onnx_bundle_records_its_checks_and_calibration(models: dict[str, Path], tmp_path: Path) -> None:
    out = bundle_from_onnx(models["good"], tmp_path / "cal", preprocessing=RGB, labelled=labelled(),
                           calibration_episodes=20)
    bundle = load_bundle(out)  # hashes and the stored reference embeddings
    m = bundle.manifest
    assert m.embedding_dim == 8 and m.preprocessing["mean"] == [0.5, 0.5, 0.5]
    assert m.backbone["input"] == "pixels" and m.backbone["output"] == "features"
    assert m.calibration is not None and bundle.calibration is not None and bundle.calibration.rule("cosine")
    assert m.parity["self_check"]["batch_sizes"] == [1, 12]
    with pytest.raises(CheckpointError, match="no PyTorch weights"):
        bundle.torch_embedder  # noqa: B018
    plain = load_bundle(bundle_from_onnx(models["good"], tmp_path / "plain", preprocessing=RGB))
    assert plain.calibration is None
    assert "not calibrated" in plain.manifest.deployment["open_set"]  # type: ignore[index]


@pytest.mark.parametrize(("model", "pre", "message"), [
    ("flat", RGB, r"input 'pixels' has shape \('batch', 768\) \(rank 2\).*image input of rank 4"),
    ("feature_map", RGB, r"output 'features' has shape \('batch', 8, 16, 16\) \(rank 4\).*pool and flatten"),
    ("good", Preprocessing("L", SIZE), r"3 channel\(s\), but mode 'L' gives 1; pass --mode RGB"),
])
def test_bad_models_are_refused_with_the_fix(models: dict[str, Path], tmp_path: Path, model: str,
                                             pre: Preprocessing, message: str) -> None:
    with pytest.raises(OnnxModelError, match=message):
        bundle_from_onnx(models[model], tmp_path / "b", preprocessing=pre)
    assert not list(tmp_path.iterdir())


def test_constant_embeddings_fail_the_self_check(models: dict[str, Path], tmp_path: Path) -> None:
    same = np.repeat(coloured((100, 100, 100), 1, 0), 4, axis=0)
    with pytest.raises(OnnxModelError, match="same embedding to all 4 sample images"):
        bundle_from_onnx(models["good"], tmp_path / "b", preprocessing=RGB, samples=same)


def test_cli_wrong_mean_length_names_the_value(models: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bundle-onnx", str(models["good"]), "--size", str(SIZE), "--mode", "RGB", "--mean", "0.5",
                 "--std", "0.25", "0.25", "0.25", "--out", str(tmp_path / "b")])
    assert code == 2
    assert "mean [0.5] has 1 value(s) but mode 'RGB' has 3 channel(s)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_cli_writes_a_calibrated_bundle(models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "labelled"
    for name, imgs in labelled(4).items():
        (folder / name).mkdir(parents=True)
        for i, a in enumerate(imgs):
            (folder / name / f"{i}.png").write_bytes(png(a))
    code = main(["bundle-onnx", str(models["good"]), "--size", str(SIZE), "--mode", "RGB", "--mean", "0.5", "0.5",
                 "0.5", "--std", "0.25", "0.25", "0.25", "--calibrate", str(folder), "--out", str(tmp_path / "b")])
    assert code == 0, capsys.readouterr().err
    assert load_bundle(tmp_path / "b").calibration is not None
