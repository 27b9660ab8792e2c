"""Fixtures for service tests: a tiny bundle (untrained Conv-4, 28x28 L, seeded), a toy embedder,
stores of both backends (SQLite file; a real PostgreSQL server started here), tiny image makers."""

from __future__ import annotations

import importlib.util
import io
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from postgres_server import find_pg_bin, fresh_database, postgres_server  # noqa: E402

from fewshot.artifacts import export_bundle  # noqa: E402
from fewshot.artifacts.embedders import check_batch  # noqa: E402
from fewshot.backbones import create_backbone  # noqa: E402
from fewshot.data.imageio import Preprocessing  # noqa: E402
from fewshot.service.store import SQLiteStore, Store, open_store  # noqa: E402

sys.path.pop(0)


def _root_conftest() -> ModuleType:
    """tests/conftest.py under its own name (`import conftest` here would find this file)."""
    spec = importlib.util.spec_from_file_location("fewshot_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


require_or_skip = _root_conftest().require_or_skip


class ToyEmbedder:
    """Deterministic numpy embedder (fixed random projection) for fast recogniser/store tests."""

    def __init__(self, dim: int = 16, channels: int = 1, size: int = 28) -> None:
        self.embedding_dim, self.channels, self.size = dim, channels, size
        self.proj = np.random.default_rng(0).standard_normal((channels * size * size, dim)).astype(np.float32)

    def embed(self, images_u8: np.ndarray) -> np.ndarray:
        check_batch(images_u8, self.channels, self.size)
        x = images_u8.reshape(len(images_u8), -1).astype(np.float32) / 255.0
        return (x @ self.proj).astype(np.float32)


def class_images(seed: int, n: int, size: int = 28) -> np.ndarray:
    """n noisy variants of one random prototype image: uint8 (n, 1, size, size)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, 1, size, size))
    noise = rng.integers(-20, 21, (n, 1, size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr[0] if arr.ndim == 3 else arr).save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_bundle(out: Path, seed: int = 0, hidden: int = 64, calibration: dict | None = None) -> Path:
    torch.manual_seed(seed)
    backbone = create_backbone("conv4", in_channels=1, image_size=28, hidden=hidden)
    samples = np.concatenate([class_images(s, 2) for s in range(4)])
    return export_bundle(backbone, out, preprocessing=Preprocessing("L", 28), source={"run": "test", "seed": seed},
                         metrics={"note": "untrained"}, data_fingerprint="synthetic", calibration=calibration,
                         sample_images=samples)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of another model: 32-d embeddings instead of 64-d."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "other", seed=1, hidden=32)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        require_or_skip("PostgreSQL binaries (initdb, pg_ctl) not found; apt-get install -y postgresql")
    assert bin_dir is not None
    with postgres_server(bin_dir) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("postgres_url")
    return fresh_database(server, f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "store.db")
    yield s
    s.close()
