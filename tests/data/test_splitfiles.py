"""Class folders with split files (the miniImageNet layout), on tiny collections made here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from datamaker import image_bytes, write_folder, write_zip

from fewshot.cli import main
from fewshot.config import DataConfig, config_from_dict
from fewshot.data.cleaning import KEPT, apply_split_rules
from fewshot.data.imageio import Preprocessing
from fewshot.data.leakage import check_leakage
from fewshot.data.prepare import prepare
from fewshot.data.splitfiles import SplitFileSource, miniimagenet_source, read_split_files
from fewshot.data.splits import make_splits
from fewshot.errors import ConfigError, DataError
from fewshot.training.data import load_run_data

# class -> split; "k0" sorts first but is a test class, so its copy of a train image comes first in
# the source's order and must still be the one dropped
SPLIT_OF = {"ka": "train", "kb": "train", "kc": "val", "k0": "test"}
PRE = Preprocessing("RGB", 16)


def _images() -> dict[str, bytes]:
    """`<class>/<class>_<i>.png` -> bytes; kc_2 and k0_2 are byte-identical copies of ka_1."""
    seeds = {cls: 10 * k for k, cls in enumerate(SPLIT_OF)}
    out = {f"{c}/{c}_{i}.png": image_bytes(seeds[c] + i, size=16, mode="RGB") for c in SPLIT_OF for i in range(3)}
    out["kc/kc_2.png"] = out["k0/k0_2.png"] = out["ka/ka_1.png"]
    return out


def write_splits(folder: Path, images: dict[str, bytes], *, extra: dict[str, str] | None = None) -> Path:
    """train/val/test.csv listing every image of `images` (plus `extra` file -> split lines)."""
    rows: dict[str, list[str]] = {s: [] for s in ("train", "val", "test")}
    for rel in images:
        cls, name = rel.split("/")
        rows[SPLIT_OF[cls]].append(f"{name},{cls}")
    for name, split in (extra or {}).items():
        rows[split].append(f"{name},{name.split('_')[0]}")
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in rows.items():
        (folder / f"{split}.csv").write_text("filename,label\n" + "\n".join(lines) + "\n")
    return folder


def make_collection(root: Path, *, as_zip: bool = True, extra: dict[str, str] | None = None) -> tuple[Path, Path]:
    """(collection, splits folder): the images under `tiny/images/`, plus ka_extra.png in no split."""
    images = _images()
    splits = write_splits(root / "splits", images, extra=extra)
    layout = {f"tiny/images/{rel}": data for rel, data in {**images, "ka/ka_extra.png": image_bytes(99)}.items()}
    if as_zip:
        return write_zip(root / "tiny.zip", layout), splits
    return write_folder(root / "coll", layout) / "tiny", splits


def test_every_file_accounted_for_and_cross_split_copies_dropped(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path)
    prepared = prepare(SplitFileSource(coll, splits), tmp_path / "cache", PRE, progress=False, workers=0)
    report, cache = prepared.report, prepared.cache
    assert report.n_files == 13 and report.n_kept == 10
    dropped = {r.source_id: (r.subset, r.status) for r in report.dropped()}
    assert dropped == {
        "ka/ka_extra.png": ("", "not_in_split"),
        "kc/kc_2.png": ("val", "split_duplicate"),
        "k0/k0_2.png": ("test", "split_duplicate"),
    }
    details = {r.source_id: r.detail for r in report.dropped()}
    assert "ka/ka_1.png in split 'train'" in details["kc/kc_2.png"] and "earlier split" in details["kc/kc_2.png"]
    assert "add it to one" in details["ka/ka_extra.png"]
    assert report.counts()["val"] == {**report.counts()["val"], KEPT: 2, "split_duplicate": 1}
    assert [(c.name, c.subset, c.count) for c in cache.classes] == [
        ("k0", "test", 2), ("ka", "train", 3), ("kb", "train", 3), ("kc", "val", 2)]
    assert cache.image_shape == (3, 16, 16) and cache.domains == ("tiny",)
    hashes = cache.content_hashes()
    assert len(set(hashes)) == len(hashes)  # no image twice anywhere in the prepared data


def test_csv_scheme_and_leakage_report(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path)
    cache = prepare(SplitFileSource(coll, splits), tmp_path / "cache", PRE, progress=False, workers=0).cache
    parts = make_splits(cache, "csv")  # the split folder comes from the cache's source
    assert {k: [cache.classes[i].name for i in s.class_ids] for k, s in parts.items()} == {
        "train": ["ka", "kb"], "val": ["kc"], "test": ["k0"]}
    leak = check_leakage(cache, parts)
    assert sorted((d.dropped, d.dropped_split, d.kept, d.kept_split) for d in leak.resolved_duplicates) == [
        ("k0/k0_2.png", "test", "ka/ka_1.png", "train"), ("kc/kc_2.png", "val", "ka/ka_1.png", "train")]
    assert "2 identical image(s) across the split files removed by prepare" in str(leak)
    assert any("kc/kc_2.png [val] dropped, ka/ka_1.png [train] kept" in w for w in leak.warnings)


def test_folder_and_zip_give_the_same_cache(tmp_path: Path) -> None:
    from_zip = prepare(SplitFileSource(*make_collection(tmp_path / "z")), tmp_path / "c1", PRE,
                       progress=False, workers=0).cache
    from_dir = prepare(SplitFileSource(*make_collection(tmp_path / "d", as_zip=False)), tmp_path / "c2", PRE,
                       progress=False, workers=0).cache
    assert from_zip.files == from_dir.files
    np.testing.assert_array_equal(np.asarray(from_zip.images), np.asarray(from_dir.images))


def test_process_pool_gives_the_same_cache(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path)
    one = prepare(SplitFileSource(coll, splits), tmp_path / "c1", PRE, progress=False, workers=0)
    pool = prepare(SplitFileSource(coll, splits), tmp_path / "c2", PRE, progress=False, workers=2, force=True)
    assert pool.report.records == one.report.records
    np.testing.assert_array_equal(np.asarray(pool.cache.images), np.asarray(one.cache.images))


def test_listed_file_missing_from_collection_names_it_and_the_fix(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path, extra={"kb_9.png": "train"})
    with pytest.raises(DataError, match=r"1 file\(s\) named in the split files .* train\.csv:8 'kb_9\.png'.*"
                                        r"replace it with the complete one, or delete those lines"):
        SplitFileSource(coll, splits)


def test_changed_split_files_rebuild_the_cache(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path)
    first = prepare(SplitFileSource(coll, splits), tmp_path / "cache", PRE, progress=False, workers=0)
    with open(splits / "train.csv", "a") as fh:
        fh.write("ka_extra.png,ka\n")
    second = prepare(SplitFileSource(coll, splits), tmp_path / "cache", PRE, progress=False, workers=0)
    assert not second.reused and second.cache.path != first.cache.path
    assert second.report.n_kept == 11 and not second.report.dropped("not_in_split")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: (d / "test.csv").unlink(), r"split file\(s\) test\.csv missing in .*splits"),
        (lambda d: (d / "val.csv").write_text("file,class\nkc_0.png,kc\n"), r"val\.csv:1: header .* is not 'filename,label'"),
        (lambda d: (d / "val.csv").write_text("filename,label\nkc_0.png\n"), r"val\.csv:2: 'kc_0\.png' is not 'filename,label'"),
        (lambda d: (d / "val.csv").write_text("filename,label\nka_0.png,ka\n"),
         r"val\.csv:2: 'ka_0\.png' is already listed at train\.csv:\d+; list every file once"),
        (lambda d: (d / "val.csv").write_text("filename,label\nkc_0.png,ka\n"),
         r"val\.csv:2: class 'ka' is also in split 'train' \(train\.csv:\d+\); few-shot splits are by class"),
    ],
)
def test_bad_split_files_name_the_line_and_the_fix(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    _, splits = make_collection(tmp_path)
    edit(splits)
    with pytest.raises(DataError, match=message):
        read_split_files(splits)


def test_label_that_is_not_the_files_folder(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path)
    text = (splits / "val.csv").read_text().replace("kc_0.png,kc", "kc_0.png,kz")
    (splits / "val.csv").write_text(text)
    with pytest.raises(DataError, match=r"val\.csv:2: 'kc_0\.png' is labelled 'kz' but sits in class folder 'kc'"):
        SplitFileSource(coll, splits)


def test_val_split_is_optional(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path)
    (splits / "val.csv").unlink()
    prepared = prepare(SplitFileSource(coll, splits), tmp_path / "cache", PRE, progress=False, workers=0)
    assert {r.source_id for r in prepared.report.dropped("not_in_split")} == {
        "ka/ka_extra.png", "kc/kc_0.png", "kc/kc_1.png", "kc/kc_2.png"}
    assert sorted(make_splits(prepared.cache, "csv")) == ["test", "train"]


def test_split_rules_keep_the_earliest_split_whatever_the_order() -> None:
    subsets = ["test", "val", "train", "train", ""]
    ids = ["t/1", "v/1", "a/1", "a/2", "x/1"]
    status = [KEPT] * 5
    detail = [""] * 5
    dups = apply_split_rules(subsets, ids, status, detail, ["h", "h", "h", "g", "k"], ("train", "val", "test"))
    assert status == ["split_duplicate", "split_duplicate", KEPT, KEPT, "not_in_split"]
    assert [(d.dropped, d.kept) for d in dups] == [("v/1", "a/1"), ("t/1", "a/1")]


def test_csv_scheme_errors(tmp_path: Path) -> None:
    coll, splits = make_collection(tmp_path)
    layout = {f"{c}/{i}.png": image_bytes(50 + 3 * k + i) for k, c in enumerate(("ka", "kb")) for i in range(3)}
    plain = prepare(write_folder(tmp_path / "plain", layout), tmp_path / "c", progress=False, workers=0).cache
    with pytest.raises(DataError, match="scheme 'csv' needs the folder of its split files.*pass splits_dir="):
        make_splits(plain, "csv")
    with pytest.raises(DataError, match=r"class 'kc' is not in cache"):
        make_splits(plain, "csv", splits_dir=splits)


def _fake_miniimagenet(root: Path) -> Path:
    images = _images()
    write_zip(root / "miniimagenet" / "miniimagenet84.zip",
              {f"miniimagenet84/images/{rel}": data for rel, data in images.items()})
    write_splits(root / "miniimagenet" / "splits" / "ravi", images)
    return root


def test_miniimagenet_absent_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"miniImageNet file .*miniimagenet84\.zip is missing\. Put "
                                        r"miniimagenet84\.zip .* in .*miniimagenet/.*splits/ravi"):
        miniimagenet_source(tmp_path)


def test_miniimagenet_config_defaults_and_run_data(tmp_path: Path) -> None:
    root = _fake_miniimagenet(tmp_path / "data")
    cfg = DataConfig(root=str(root), dataset="miniimagenet", image_size=16, cache_dir=str(tmp_path / "cache"))
    assert (cfg.mode, cfg.split, DataConfig(dataset="miniimagenet").image_size) == ("RGB", "csv", 84)
    data = load_run_data(cfg, progress=False)
    assert data.cache.image_shape == (3, 16, 16) and data.class_names("test") == ["k0"]
    assert len(data.cache) == 10  # 12 files; the val and test copies of ka_1 dropped


def test_config_split_files_validation() -> None:
    assert DataConfig(dataset="some/folder", splits_dir="some/splits").split == "csv"
    assert DataConfig(dataset="miniimagenet", split="classes", mode="L").split == "classes"
    with pytest.raises(ConfigError, match="split 'csv' reads .* from data.splits_dir, which is not set"):
        config_from_dict({"data": {"dataset": "some/folder", "split": "csv"}})


def test_cli_prepare_miniimagenet(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_miniimagenet(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--data", str(root), "--dataset", "miniimagenet", "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "| split_duplicate | 1 | 0 | 1 | 2 |" in out and "16-RGB" in out
    assert main(["prepare", "--data", str(root), "--dataset", "miniimagenet", "--download"]) == 2
    assert "--download fetches the Omniglot zips only" in capsys.readouterr().err


def test_scratch_rows_of_a_killed_prepare_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    from fewshot.data.prepare import SCRATCH_PREFIX

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / "cache" / f"{SCRATCH_PREFIX}{dead}-abc.u8"
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    mine = tmp_path / "cache" / f"{SCRATCH_PREFIX}{os.getpid()}-abc.u8"
    mine.write_bytes(b"x")
    coll, splits = make_collection(tmp_path)
    prepare(SplitFileSource(coll, splits), tmp_path / "cache", PRE, progress=False, workers=0)
    assert mine.exists() and not stale.exists()  # a running prepare's file is left alone
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".u8") and p != mine]
