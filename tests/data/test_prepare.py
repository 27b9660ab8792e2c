from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from datamaker import fake_omniglot, image_bytes, write_folder

import fewshot.data.cache as cache_module
from fewshot.data.cache import PackedCache
from fewshot.data.imageio import Preprocessing, decode_image
from fewshot.data.prepare import REPORT_NAME, prepare, prepare_omniglot
from fewshot.data.sources import OmniglotSource
from fewshot.errors import CacheError, DataError


def _folder(root: Path, n_classes: int = 3, per_class: int = 4) -> Path:
    layout = {f"c{c}/{i}.png": image_bytes(100 * c + i) for c in range(n_classes) for i in range(per_class)}
    return write_folder(root, layout)


def test_cache_contents_match_decode(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    pre = Preprocessing("L", 12)
    prepared = prepare(src, tmp_path / "cache", pre, progress=False, workers=0)
    cache = prepared.cache
    assert cache.images.shape == (12, 1, 12, 12)
    assert [(c.name, c.start, c.count) for c in cache.classes] == [("c0", 0, 4), ("c1", 4, 4), ("c2", 8, 4)]
    row = cache.files.index("c1/2.png")
    np.testing.assert_array_equal(cache.images[row], decode_image((src / "c1/2.png").read_bytes(), pre))
    assert len(cache.content_hashes()) == 12 and len(cache.index["phashes"]) == 12
    assert cache.index["report_summary"]["n_files"] == 12
    assert cache.path.name.startswith("src-") and cache.path.name.endswith("-12-L")


def test_unchanged_source_reuses_cache(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    first = prepare(src, tmp_path / "cache", progress=False, workers=0)
    t0 = time.perf_counter()
    again = prepare(src, tmp_path / "cache", progress=False, workers=0)
    assert again.reused and not first.reused
    assert time.perf_counter() - t0 < 1.0
    assert again.cache.path == first.cache.path and again.report.records == first.report.records


def test_changed_source_or_preprocessing_rebuilds(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    first = prepare(src, tmp_path / "cache", progress=False, workers=0)
    (src / "c0" / "9.png").write_bytes(image_bytes(999))
    changed = prepare(src, tmp_path / "cache", progress=False, workers=0)
    assert not changed.reused and changed.cache.path != first.cache.path and len(changed.cache) == 13
    bigger = prepare(src, tmp_path / "cache", Preprocessing("L", 20), progress=False, workers=0)
    assert not bigger.reused and bigger.cache.image_shape == (1, 20, 20)
    forced = prepare(src, tmp_path / "cache", Preprocessing("L", 20), progress=False, force=True, workers=0)
    assert not forced.reused and forced.cache.path == bigger.cache.path


def test_cache_from_another_version_names_fix_and_prepare_rebuilds(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    path = prepare(src, tmp_path / "cache", progress=False, workers=0).cache.path
    index = json.loads((path / "index.json").read_text())
    index["format_version"] = 999
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"format version 999.*re-run `fewshot prepare`"):
        PackedCache.open(path)
    rebuilt = prepare(src, tmp_path / "cache", progress=False, workers=0)
    assert not rebuilt.reused and rebuilt.cache.path == path
    assert PackedCache.open(path).index["format_version"] != 999


def test_killed_prepare_keeps_old_cache_and_leaves_no_partial_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _folder(tmp_path / "src")
    old = prepare(src, tmp_path / "cache", progress=False, workers=0)
    old_images = np.array(old.cache.images)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(cache_module.json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "cache", progress=False, force=True, workers=0)
    (src / "c0" / "9.png").write_bytes(image_bytes(999))  # a changed source: a new cache folder
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "cache", progress=False, workers=0)
    monkeypatch.undo()

    np.testing.assert_array_equal(PackedCache.open(old.cache.path).images, old_images)
    for d in (tmp_path / "cache").iterdir():
        if d != old.cache.path:
            with pytest.raises(CacheError):
                PackedCache.open(d)
    assert [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")] == [old.cache.path]


def test_missing_report_means_rebuild(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src")
    first = prepare(src, tmp_path / "cache", progress=False, workers=0)
    (first.cache.path / REPORT_NAME).unlink()  # killed between the cache rename and the report
    again = prepare(src, tmp_path / "cache", progress=False, workers=0)
    assert not again.reused and (again.cache.path / REPORT_NAME).is_file()


def test_no_usable_images(tmp_path: Path) -> None:
    src = write_folder(tmp_path / "src", {"a/1.txt": b"x", "a/2.txt": b"y"})
    with pytest.raises(DataError, match="no usable images among 2 files"):
        prepare(src, tmp_path / "cache", progress=False, workers=0)


def test_process_pool_gives_the_same_cache(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", n_classes=4, per_class=8)
    inline = prepare(src, tmp_path / "a", progress=False, workers=0)
    pooled = prepare(src, tmp_path / "b", progress=False, workers=2)
    np.testing.assert_array_equal(inline.cache.images, pooled.cache.images)
    assert inline.cache.index["content_hashes"] == pooled.cache.index["content_hashes"]


def test_fake_omniglot_prepares_with_subsets(tmp_path: Path) -> None:
    fake_omniglot(tmp_path)
    with pytest.raises(DataError, match="partial"):
        prepare_omniglot(tmp_path, tmp_path / "cache", progress=False)
    prepared = prepare(OmniglotSource(tmp_path, check_counts=False), tmp_path / "cache", progress=False, workers=0)
    cache = prepared.cache
    assert len(cache.classes) == 12 and len(cache) == 48
    assert {c.subset for c in cache.classes} == {"background", "evaluation"}
    assert cache.classes[0].name == "Alpha0/character01" and cache.classes[0].domain == "Alpha0"
    assert cache.path.name.startswith("omniglot-")


def test_broken_worker_pool_falls_back_to_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where spawn workers cannot start (code run from stdin), prepare still builds the same cache."""
    from concurrent.futures.process import BrokenProcessPool

    import fewshot.data.prepare as prepare_module

    root = _folder(tmp_path / "src", n_classes=2, per_class=3)
    reference = prepare(root, tmp_path / "ref", progress=False, workers=1).cache
    real = prepare_module._run_batches

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        if args[-1] > 1:  # n_workers
            raise BrokenProcessPool("no workers")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_run_batches", broken)
    with pytest.warns(UserWarning, match="decoding in this process"):
        cache = prepare(root, tmp_path / "out", progress=False, workers=2).cache
    assert np.array_equal(np.asarray(cache.images), np.asarray(reference.images))
