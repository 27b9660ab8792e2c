"""Shared fixtures. Unit tests make tiny data inside the test; integration tests read the real
Omniglot under FEWSHOT_DATA (default: ../shared/datasets beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests run only with FEWSHOT_SLOW=1 or when selected with -m."""
    if _truthy("FEWSHOT_SLOW") or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow: set FEWSHOT_SLOW=1 or select with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def require_or_skip(reason: str) -> None:
    """Skip locally when an external resource is missing; fail in CI (FEWSHOT_REQUIRE_ALL=1)."""
    if _truthy("FEWSHOT_REQUIRE_ALL"):
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("FEWSHOT_DATA", REPO.parent / "shared" / "datasets")).resolve()
    if not (root / "omniglot" / "images_background.zip").is_file():
        require_or_skip(f"real Omniglot not found under {root}; set FEWSHOT_DATA")
    return root


@pytest.fixture(scope="session")
def real_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the real datasets in a test session: each cache is keyed by its source
    and preprocessing (`fewshot.data.prepare.cache_dir`), so the tests that read the same data at the
    same size share one build instead of decoding 32k-60k images again."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="session")
def omniglot_prepared(data_root: Path, real_cache_root: Path):  # type: ignore[no-untyped-def]
    """Full Omniglot prepared once per test session (28x28, grayscale)."""
    from fewshot.data.prepare import prepare_omniglot

    return prepare_omniglot(data_root, real_cache_root, progress=False)


@pytest.fixture(scope="session")
def omniglot_cache(omniglot_prepared):  # type: ignore[no-untyped-def]
    return omniglot_prepared.cache
