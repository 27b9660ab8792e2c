"""Bundle export/load: files and manifest, ONNX parity, refusal of bad exports and tampered bundles."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_helpers import export_tiny, sample_images, tiny_backbone

from fewshot.artifacts import (
    BUNDLE_FORMAT_VERSION,
    Calibration,
    Embedder,
    ParityError,
    calibrate_open_set,
    load_bundle,
)
from fewshot.artifacts.bundle import MANIFEST, ONNX, WEIGHTS, sha256_file
from fewshot.errors import CheckpointError, ConfigError


def test_bundle_files_and_manifest(tiny_bundle_dir: Path) -> None:
    names = sorted(p.name for p in tiny_bundle_dir.iterdir())
    assert names == ["manifest.json", "model.onnx", "parity.safetensors", "weights.safetensors"]
    m = json.loads((tiny_bundle_dir / MANIFEST).read_text())
    assert m["format_version"] == BUNDLE_FORMAT_VERSION
    assert m["backbone"] == tiny_backbone().config  # the exact arguments that rebuild it
    assert m["preprocessing"] == {"mode": "L", "size": 28, "resample": "lanczos"}
    assert m["embedding_dim"] == 64
    assert m["data_fingerprint"] == "synthetic-v1" and m["source"] == {"run": "test"}
    assert set(m["versions"]) >= {"fewshot", "torch", "onnx", "onnxruntime"}
    assert m["sha256"][ONNX] == sha256_file(tiny_bundle_dir / ONNX)
    assert m["bundle_id"] == m["sha256"][WEIGHTS][:16]
    assert m["parity"]["max_abs_diff"] <= 1e-4 and m["parity"]["batch_sizes"] == [1, 16]


def test_no_pickle_anywhere(tiny_bundle_dir: Path) -> None:
    for f in tiny_bundle_dir.iterdir():
        data = f.read_bytes()
        assert not zipfile.is_zipfile(f), f"{f.name} is a zip (torch.save format)"
        assert not data.startswith(b"\x80"), f"{f.name} starts like a pickle"


def test_load_gives_matching_torch_and_onnx_embedders(tiny_bundle_dir: Path) -> None:
    b = load_bundle(tiny_bundle_dir)
    assert isinstance(b.onnx_embedder, Embedder) and isinstance(b.torch_embedder, Embedder)
    for n in (1, 5, 33):  # dynamic batch dimension
        x = sample_images(n, seed=n)
        a, t = b.onnx_embedder.embed(x), b.torch_embedder.embed(x)
        assert a.shape == (n, 64) and a.dtype == np.float32
        assert np.abs(a - t).max() <= 1e-4
    # the loaded weights are the exported ones
    ref = tiny_backbone().eval()
    x = sample_images(3)
    with torch.no_grad():
        expect = ref(torch.from_numpy(x.astype(np.float32) / 255)).numpy()
    assert np.abs(b.torch_embedder.embed(x) - expect).max() <= 1e-5


def test_load_never_unpickles(tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("load_bundle unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_bundle(tiny_bundle_dir)


def test_refuses_existing_out_dir(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        export_tiny(tmp_path / "b")


class TrainModeDropout(torch.nn.Module):
    """A backbone whose eager output differs from what ONNX traces: parity must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_backbone()
        self.embedding_dim, self.config = self.inner.embedding_dim, self.inner.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if torch.compiler.is_compiling():  # the exported graph sees a different function
            return out * 1.01
        return out


def test_parity_failure_refuses_bundle_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="differ by"):
        export_tiny(tmp_path / "bad", backbone=TrainModeDropout())
    assert list(tmp_path.iterdir()) == []


def test_bad_sample_images_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"uint8 \(N, 1, 28, 28\)"):
        export_tiny(tmp_path / "b", sample_images=np.zeros((2, 3, 28, 28), np.uint8))
    assert list(tmp_path.iterdir()) == []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tampered_onnx_refused_by_hash(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    b = _copy(tiny_bundle_dir, tmp_path / "t")
    data = bytearray((b / ONNX).read_bytes())
    data[-100] ^= 0xFF
    (b / ONNX).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 .* does not match"):
        load_bundle(b)


def test_onnx_of_other_weights_refused_even_with_updated_hash(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    """An attacker or a bad script swaps model.onnx and fixes the manifest hash: parity catches it."""
    other = export_tiny(tmp_path / "other", backbone=tiny_backbone(seed=7))
    b = _copy(tiny_bundle_dir, tmp_path / "t")
    shutil.copy(other / ONNX, b / ONNX)
    m = json.loads((b / MANIFEST).read_text())
    m["sha256"][ONNX] = sha256_file(b / ONNX)
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ParityError, match="disagree"):
        load_bundle(b)


def test_missing_file_and_bad_manifest(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    b = _copy(tiny_bundle_dir, tmp_path / "t")
    (b / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="weights.safetensors is missing"):
        load_bundle(b)
    (b / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_bundle(b)
    with pytest.raises(CheckpointError, match="not a bundle"):
        load_bundle(tmp_path)


def test_calibration_stored_and_validated(tmp_path: Path) -> None:
    b0 = load_bundle(export_tiny(tmp_path / "b0"))
    rng = np.random.default_rng(0)
    by_class = {f"c{i}": np.clip(sample_images(1, seed=i) + rng.integers(-5, 6, (8, 1, 28, 28)), 0, 255).astype(np.uint8)
                for i in range(8)}
    cal = calibrate_open_set(b0.onnx_embedder, by_class, np.random.default_rng(1), n_way=3, n_shot=2,
                             n_query=3, n_episodes=30)
    assert set(cal.rules) == {"euclidean", "cosine"}
    b1 = load_bundle(export_tiny(tmp_path / "b1", calibration=cal.to_dict()))
    assert b1.calibration == cal
    assert dict(b1.decision.open_set) == cal.rules  # the manifest's typed decision serves the calibrated rules
    with pytest.raises(ConfigError, match="malformed"):
        export_tiny(tmp_path / "b2", calibration={"threshold": 1.0})
    assert not (tmp_path / "b2").exists()
    assert Calibration.from_dict(cal.to_dict()) == cal
