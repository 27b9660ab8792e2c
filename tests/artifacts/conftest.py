"""A tiny seeded bundle (untrained Conv-4, 28x28 grayscale) shared by the artifact tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from artifact_helpers import export_tiny


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("art") / "bundle")
