from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datamaker import fake_omniglot, image_bytes, write_folder

from fewshot.data.cache import PackedCache
from fewshot.data.leakage import check_leakage
from fewshot.data.prepare import prepare
from fewshot.data.sources import OmniglotSource
from fewshot.data.splits import Split, list_split_schemes, make_splits
from fewshot.errors import ConfigError, DataError


@pytest.fixture()
def domains_cache(tmp_path: Path) -> PackedCache:
    """10 domains x 5 classes x 2 images, all distinct."""
    layout = {f"d{d}/k{k}/{i}.png": image_bytes(1000 * d + 10 * k + i, size=16) for d in range(10) for k in range(5) for i in range(2)}
    return prepare(write_folder(tmp_path / "src", layout), tmp_path / "cache", progress=False, workers=0).cache


@pytest.fixture()
def omni_cache(tmp_path: Path) -> PackedCache:
    root = fake_omniglot(tmp_path / "data", alphabets=5, chars=3, drawers=2)
    return prepare(OmniglotSource(root, check_counts=False), tmp_path / "cache", progress=False, workers=0).cache


def _ids(split: Split) -> list[int]:
    return split.class_ids.tolist()


def test_schemes_listed_and_unknown_scheme_names_them(domains_cache: PackedCache) -> None:
    assert list_split_schemes() == ["classes", "csv", "domains", "lake", "vinyals"]
    with pytest.raises(ConfigError, match=r"unknown split scheme 'random'.*'classes', 'csv', 'domains', 'lake', 'vinyals'"):
        make_splits(domains_cache, "random")


def test_bad_fractions(domains_cache: PackedCache) -> None:
    with pytest.raises(ConfigError, match="summing to 1"):
        make_splits(domains_cache, "classes", fractions=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("scheme", ["domains", "classes"])
def test_split_determinism_by_seed(domains_cache: PackedCache, scheme: str) -> None:
    a = make_splits(domains_cache, scheme, seed=1)
    b = make_splits(domains_cache, scheme, seed=1)
    c = make_splits(domains_cache, scheme, seed=2)
    assert all(_ids(a[k]) == _ids(b[k]) for k in a)
    assert any(_ids(a[k]) != _ids(c[k]) for k in a)
    covered = sorted(i for s in a.values() for i in _ids(s))
    assert covered == list(range(len(domains_cache.classes)))  # every class in exactly one split
    check_leakage(domains_cache, a)


def test_domains_holds_out_whole_domains(domains_cache: PackedCache) -> None:
    splits = make_splits(domains_cache, "domains", seed=0)
    doms = {k: {domains_cache.classes[i].domain for i in _ids(s)} for k, s in splits.items()}
    assert [len(doms[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    assert not (doms["train"] & doms["val"]) and not (doms["train"] & doms["test"])


def test_classes_splits_within_every_domain(domains_cache: PackedCache) -> None:
    splits = make_splits(domains_cache, "classes", seed=0)
    for s in splits.values():
        assert {domains_cache.classes[i].domain for i in _ids(s)} == set(domains_cache.domains)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [30, 10, 10]


def test_domains_needs_enough_domains(tmp_path: Path) -> None:
    layout = {f"k{k}/{i}.png": image_bytes(10 * k + i) for k in range(4) for i in range(2)}
    cache = prepare(write_folder(tmp_path / "one", layout), tmp_path / "c", progress=False, workers=0).cache
    with pytest.raises(DataError, match="1 domain.*use scheme 'classes'"):
        make_splits(cache, "domains")
    with pytest.raises(DataError, match="scheme 'lake' needs Omniglot"):
        make_splits(cache, "lake")


def test_lake_scheme(omni_cache: PackedCache) -> None:
    splits = make_splits(omni_cache, "lake", seed=0, fractions=(0.6, 0.4, 0.0))
    subset = {k: {omni_cache.classes[i].subset for i in _ids(s)} for k, s in splits.items()}
    assert subset == {"train": {"background"}, "val": {"background"}, "test": {"evaluation"}}
    # validation holds out round(0.4 * 3) = 1 character of each of the 5 background alphabets:
    # every alphabet stays in training
    assert len(splits["val"]) == 5
    domains = {k: {omni_cache.classes[i].domain for i in _ids(s)} for k, s in splits.items()}
    assert domains["train"] == domains["val"] and len(domains["train"]) == 5
    assert not splits["train"].rotations.any()
    no_val = make_splits(omni_cache, "lake", seed=0, fractions=(1.0, 0.0, 0.0))
    assert set(no_val) == {"train", "test"} and len(no_val["train"]) == 5 * 3
    rotated = make_splits(omni_cache, "lake", seed=0, fractions=(0.6, 0.4, 0.0), rotations=True)
    assert len(rotated["test"]) == 4 * len(splits["test"])
    assert rotated["test"].rotations[:4].tolist() == [0, 1, 2, 3]
    check_leakage(omni_cache, rotated)  # four rotations of a character in one split: no leak


def test_lake_holds_out_whole_alphabets_for_within_alphabet_validation(tmp_path: Path) -> None:
    root = fake_omniglot(tmp_path / "data", alphabets=4, chars=20, drawers=2)
    cache = prepare(OmniglotSource(root, check_counts=False), tmp_path / "cache", progress=False, workers=0).cache
    splits = make_splits(cache, "lake", seed=3, fractions=(1.0, 0.0, 0.0), val_alphabets=2)
    domains = {k: {cache.classes[i].domain for i in _ids(s)} for k, s in splits.items()}
    # two whole alphabets (all 20 characters each) are val, the other two train: no alphabet in both
    assert len(domains["val"]) == 2 and len(splits["val"]) == 40
    assert len(domains["train"]) == 2 and not domains["train"] & domains["val"]
    assert make_splits(cache, "lake", seed=3, fractions=(1.0, 0.0, 0.0), val_alphabets=2)["val"].class_ids.tolist() \
        == splits["val"].class_ids.tolist()
    # with a fraction too, the remaining alphabets also lose characters to val
    both = make_splits(cache, "lake", seed=3, fractions=(0.9, 0.1, 0.0), val_alphabets=1)
    assert len(both["val"]) == 20 + 3 * 2
    check_leakage(cache, both)
    with pytest.raises(ConfigError, match="val_alphabets=4: only 4 of the 4 background alphabets.*at most 3"):
        make_splits(cache, "lake", val_alphabets=4)
    with pytest.raises(ConfigError, match="needs scheme 'lake', not 'classes'"):
        make_splits(cache, "classes", val_alphabets=1)


def test_lake_alphabets_too_small_to_validate_within_are_never_held_out(omni_cache: PackedCache) -> None:
    with pytest.raises(ConfigError, match="only 0 of the 5 background alphabets have 20\\+ characters"):
        make_splits(omni_cache, "lake", val_alphabets=1)


def _write_vinyals(folder: Path, splits: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, classes in splits.items():
        lines = [f"{c}/rot{deg:03d}" for c in classes for deg in (0, 90, 180, 270)]
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_vinyals_scheme_reads_files_next_to_source(omni_cache: PackedCache, tmp_path: Path) -> None:
    names = [c.name for c in omni_cache.classes]
    _write_vinyals(tmp_path / "data" / "omniglot" / "splits" / "vinyals", {"train": names[:20], "val": names[20:25], "test": names[25:]})
    splits = make_splits(omni_cache, "vinyals")
    assert [len(splits[k]) for k in ("train", "val", "test")] == [80, 20, 20]
    assert splits["val"].rotations[:4].tolist() == [0, 1, 2, 3]
    assert [len(s) for s in make_splits(omni_cache, "vinyals", rotations=False).values()] == [20, 5, 5]
    check_leakage(omni_cache, splits)


def test_vinyals_bad_line_and_unknown_class(omni_cache: PackedCache, tmp_path: Path) -> None:
    folder = _write_vinyals(tmp_path / "v", {"train": ["Alpha0/character01"], "val": ["Nope/character01"], "test": []})
    with pytest.raises(DataError, match=r"val.txt:1: class 'Nope/character01' is not in cache"):
        make_splits(omni_cache, "vinyals", splits_dir=folder)
    (folder / "val.txt").write_text("Alpha0/character02/rot045\n")
    with pytest.raises(DataError, match=r"val.txt:1: 'Alpha0/character02/rot045'"):
        make_splits(omni_cache, "vinyals", splits_dir=folder)
    with pytest.raises(DataError, match="no vinyals split files"):
        make_splits(omni_cache, "vinyals", splits_dir=tmp_path / "empty")


def test_leakage_check_catches_shared_class(domains_cache: PackedCache) -> None:
    splits = make_splits(domains_cache, "classes", seed=0)
    leaked = dict(splits)
    extra = splits["train"].class_ids[:1]
    leaked["test"] = Split("test", np.concatenate([splits["test"].class_ids, extra]), np.zeros(len(splits["test"]) + 1, dtype=np.int64))
    name = domains_cache.classes[int(extra[0])].name
    with pytest.raises(DataError, match=rf"1 class\(es\) are in both 'train' and 'test'.*{name}"):
        check_leakage(domains_cache, leaked)


def test_leakage_check_catches_shared_class_under_another_rotation(omni_cache: PackedCache) -> None:
    splits = make_splits(omni_cache, "lake", seed=0, fractions=(0.6, 0.4, 0.0))
    cid = splits["test"].class_ids[:1]
    leaked = {**splits, "train": Split("train", np.concatenate([splits["train"].class_ids, cid]), np.concatenate([splits["train"].rotations, [2]]))}
    with pytest.raises(DataError, match="in both 'train' and 'test'"):
        check_leakage(omni_cache, leaked)


def test_leakage_check_catches_identical_image_in_two_classes(tmp_path: Path) -> None:
    same = image_bytes(7)
    layout = {f"d{d}/k{k}/{i}.png": image_bytes(100 * d + 10 * k + i) for d in range(3) for k in range(2) for i in range(3)}
    layout["d0/k0/copy.png"] = same
    layout["d2/k1/copy.png"] = same
    prepared = prepare(write_folder(tmp_path / "src", layout), tmp_path / "c", progress=False, workers=0)
    assert any("d0/k0/copy.png" in w and "d2/k1/copy.png" in w for w in prepared.report.warnings)
    splits = make_splits(prepared.cache, "domains", seed=0, fractions=(1 / 3, 1 / 3, 1 / 3))
    with pytest.raises(DataError, match=r"identical image in .*copy.png.*copy.png"):
        check_leakage(prepared.cache, splits)


def test_near_duplicates_are_warnings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    near = base.copy()
    near[0, 0] ^= 1  # one pixel differs: not identical, same dHash
    from io import BytesIO

    from PIL import Image

    def png(a: np.ndarray) -> bytes:
        buf = BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue()

    layout = {f"d{d}/k{k}/{i}.png": image_bytes(100 * d + 10 * k + i, size=32) for d in range(3) for k in range(2) for i in range(3)}
    layout["d0/k0/orig.png"] = png(base)
    layout["d1/k0/near.png"] = png(near)
    cache = prepare(write_folder(tmp_path / "src", layout), tmp_path / "c", progress=False, workers=0).cache
    splits = make_splits(cache, "domains", seed=0, fractions=(1 / 3, 1 / 3, 1 / 3))
    report = check_leakage(cache, splits)
    assert report.n_near_duplicates == 1
    assert "orig.png" in report.warnings[0] and "near.png" in report.warnings[0]
    assert "1 near-duplicate pair" in str(report)


def test_split_rejects_mismatched_arrays() -> None:
    with pytest.raises(DataError, match="equal-length"):
        Split("train", np.zeros(3, dtype=np.int64), np.zeros(2, dtype=np.int64))


def test_index_without_hashes_is_refused(domains_cache: PackedCache) -> None:
    index = json.loads((domains_cache.path / "index.json").read_text())
    del index["content_hashes"]
    bare = PackedCache(domains_cache.path, index, domains_cache.images)
    with pytest.raises(DataError, match="no per-image content hashes"):
        check_leakage(bare, make_splits(bare, "classes"))
