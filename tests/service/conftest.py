"""Fixtures for service tests: a tiny bundle (untrained Conv-4, 28x28 L, seeded), a toy embedder,
stores of both backends (SQLite file; a real PostgreSQL server started here), tiny image makers."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from model_helpers import make_rgb_bundle
from postgres_server import find_pg_bin, fresh_database, postgres_server  # tests/service/
from service_helpers import make_tiny_bundle

from fewshot.service.store import SQLiteStore, Store, open_store


def _root_conftest() -> ModuleType:
    """tests/conftest.py under its own name (`import conftest` here would find this file)."""
    spec = importlib.util.spec_from_file_location("fewshot_tests_root_conftest", Path(__file__).parents[1] / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


require_or_skip = _root_conftest().require_or_skip


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="session")
def domain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle's model with a domain summary (grayscale noise patterns)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "domain", domain=True)


@pytest.fixture(scope="session")
def other_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of another model: 32-d embeddings instead of 64-d."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "other", seed=1, hidden=32)


@pytest.fixture(scope="session")
def rgb_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RGB model (32x32, mean/std, 32-d) whose manifest names it "photos"."""
    return make_rgb_bundle(tmp_path_factory.mktemp("bundle") / "rgb")


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
