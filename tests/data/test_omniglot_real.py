"""Integration: the real Omniglot under FEWSHOT_DATA, prepared once per session (conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fewshot.data.leakage import check_leakage
from fewshot.data.prepare import prepare_omniglot
from fewshot.data.splits import make_splits

pytestmark = pytest.mark.integration


def test_report_accounts_for_every_file(omniglot_prepared: Any) -> None:
    report, cache = omniglot_prepared.report, omniglot_prepared.cache
    assert report.n_files == 32_460
    counts = report.counts()
    assert sum(counts["background"].values()) == 19_280 and sum(counts["evaluation"].values()) == 13_180
    # the one known duplicate pair (both a single dot) is pixel-identical at full resolution
    dropped = report.dropped()
    assert [(r.source_id, r.status) for r in dropped] == [
        ("images_background/Braille/character01/0192_19.png", "duplicate")
    ]
    assert "0192_03.png" in dropped[0].detail
    assert len(cache) == 32_459 and len(cache.classes) == 1_623 and len(cache.domains) == 50
    assert cache.image_shape == (1, 28, 28)


def test_warm_prepare_reuses_cache(omniglot_prepared: Any, data_root: Path) -> None:
    again = prepare_omniglot(data_root, omniglot_prepared.cache.path.parent, progress=False)
    assert again.reused and again.cache.path == omniglot_prepared.cache.path
    assert again.report.summary() == omniglot_prepared.report.summary()


@pytest.mark.parametrize("scheme", ["lake", "vinyals", "domains", "classes"])
def test_leakage_check_passes(omniglot_cache: Any, scheme: str) -> None:
    splits = make_splits(omniglot_cache, scheme, seed=0)
    report = check_leakage(omniglot_cache, splits)
    assert sum(report.images_per_split.values()) == len(omniglot_cache)


def test_lake_with_rotations_passes(omniglot_cache: Any) -> None:
    check_leakage(omniglot_cache, make_splits(omniglot_cache, "lake", rotations=True))


def test_vinyals_counts(omniglot_cache: Any) -> None:
    splits = make_splits(omniglot_cache, "vinyals")
    assert {k: len(s) for k, s in splits.items()} == {"train": 1028 * 4, "val": 172 * 4, "test": 423 * 4}
    assert {k: len(set(s.class_ids.tolist())) for k, s in splits.items()} == {"train": 1028, "val": 172, "test": 423}
    assert sorted(set(splits["train"].rotations.tolist())) == [0, 1, 2, 3]


def test_cifar_subset_zip_with_subset_first_level(data_root: Path, tmp_path: Path) -> None:
    from fewshot.data.imageio import Preprocessing
    from fewshot.data.prepare import prepare
    from fewshot.data.sources import ImageFolderSource

    zip_path = data_root / "cifar10-subset" / "cifar10_subset.zip"
    if not zip_path.is_file():
        pytest.skip(f"{zip_path} not found")
    prepared = prepare(ImageFolderSource(zip_path, first_level="subset"), tmp_path, Preprocessing("RGB", 32), progress=False)
    cache = prepared.cache
    assert len(cache) == 6_000 and cache.domains == ("cifar10_subset",)
    assert [(c.count, c.subset) for c in cache.classes] == [(600, "test+train")] * 10
    check_leakage(cache, make_splits(cache, "classes", seed=0))
