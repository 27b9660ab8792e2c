"""Integration: the real miniImageNet (84x84, Ravi & Larochelle split) under FEWSHOT_DATA.

Prepared once for this module (about 20 s on 2 free cores, more on a busy machine: hence slow).
The expected duplicates are the 8 pixel-identical pairs listed in miniimagenet/SOURCES.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from fewshot.data.imageio import Preprocessing
from fewshot.data.leakage import check_leakage
from fewshot.data.prepare import PreparedData, prepare
from fewshot.data.splitfiles import miniimagenet_source
from fewshot.data.splits import make_splits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WITHIN_CLASS = ("n02091831/n0209183100001256.jpg", "n02091831/n0209183100000748.jpg")
ACROSS_TRAIN_CLASSES = ("n02108551/n0210855100000121.jpg", "n02111277/n0211127700000207.jpg")
# (validation copy: dropped, training copy: kept)
VAL_TRAIN = [
    ("n02950826/n0295082600000439.jpg", "n04389033/n0438903300000447.jpg"),
    *[(f"n03535780/n03535780{v:08d}.jpg", f"n03888605/n03888605{t:08d}.jpg")
      for v, t in ((253, 943), (484, 663), (512, 646), (601, 751), (1275, 1285))],
]


@pytest.fixture(scope="module")
def mini(data_root: Path, real_cache_root: Path) -> PreparedData:
    if not (data_root / "miniimagenet" / "miniimagenet84.zip").is_file():
        if os.environ.get("FEWSHOT_REQUIRE_ALL", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"required in CI but unavailable: miniImageNet under {data_root}")
        pytest.skip(f"miniImageNet not found under {data_root}; set FEWSHOT_DATA")
    return prepare(miniimagenet_source(data_root), real_cache_root,
                   Preprocessing("RGB", 84), progress=False)


def test_report_accounts_for_all_60000_files(mini: PreparedData) -> None:
    report, cache = mini.report, mini.cache
    assert report.n_files == 60_000
    assert {s: sum(c.values()) for s, c in report.counts().items()} == {"train": 38_400, "val": 9_600, "test": 12_000}
    dropped = {r.source_id: (r.status, r.detail) for r in report.dropped()}
    assert {k: v[0] for k, v in dropped.items()} == {
        WITHIN_CLASS[0]: "duplicate", **{val: "split_duplicate" for val, _ in VAL_TRAIN}}
    for val, train in VAL_TRAIN:
        assert f"{train} in split 'train'" in dropped[val][1]
    assert report.warnings == (f"identical image in several classes: {', '.join(ACROSS_TRAIN_CLASSES)}",)
    assert len(cache) == 59_993 and cache.image_shape == (3, 84, 84) and len(cache.classes) == 100


def test_ravi_split_has_no_image_twice_and_reports_the_cross_split_copies(mini: PreparedData) -> None:
    cache = mini.cache
    splits = make_splits(cache, "csv")
    assert {k: len(s) for k, s in splits.items()} == {"train": 64, "val": 16, "test": 20}
    hashes = cache.content_hashes()
    per_split = {k: {hashes[r] for i in s.class_ids for r in range(cache.classes[i].start,
                                                                    cache.classes[i].start + cache.classes[i].count)}
                 for k, s in splits.items()}
    assert not (per_split["train"] & per_split["val"]) and not (per_split["train"] & per_split["test"])
    assert not (per_split["val"] & per_split["test"])
    leak = check_leakage(cache, splits)  # raises on a shared class or an identical image
    assert leak.images_per_split == {"train": 38_399, "val": 9_594, "test": 12_000}
    assert sorted((d.dropped, d.kept) for d in leak.resolved_duplicates) == sorted(VAL_TRAIN)
    assert {(d.dropped_split, d.kept_split) for d in leak.resolved_duplicates} == {("val", "train")}


def test_warm_prepare_reuses_the_cache(mini: PreparedData, data_root: Path) -> None:
    again: Any = prepare(miniimagenet_source(data_root), mini.cache.path.parent, Preprocessing("RGB", 84),
                         progress=False)
    assert again.reused and again.cache.path == mini.cache.path


def test_trains_on_the_64_training_classes_and_evaluates_on_the_20_test_classes(
        mini: PreparedData, data_root: Path, tmp_path: Path) -> None:
    import csv

    from fewshot.config import config_from_dict
    from fewshot.training.data import RunData
    from fewshot.training.loop import train
    from fewshot.training.protocol import evaluate_run
    from fewshot.training.runs import train_classes

    splits = make_splits(mini.cache, "csv")
    config = config_from_dict({
        "name": "mini-smoke", "seed": 0, "output_dir": str(tmp_path),
        "data": {"dataset": "miniimagenet", "root": str(data_root)},
        "model": {"backbone": "conv4", "backbone_args": {"width": 0.5}, "learner": "protonet"},
        "train": {"steps": 40, "way": 5, "shot": 5, "query": 5, "lr": 0.003, "crop_pad": 8, "hflip": True,
                  "val_every": 40, "val_episodes": 20, "val_way": 5, "val_shot": 5, "checkpoint_every": 40},
    })
    data = RunData(mini.cache, splits, "csv")
    result = train(config, data=data, progress=False)
    assert result.steps == 40
    with open(result.run_dir / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05, losses  # it learns
    names = {mini.cache.classes[i].name for i in splits["train"].class_ids}
    assert train_classes(result.run_dir) == names and len(names) == 64
    test_names = {mini.cache.classes[i].name for i in splits["test"].class_ids}
    assert not names & test_names
    res = evaluate_run(result.run_dir, way=5, shot=1, query=15, episodes=600, seed=1, split="test", data=data,
                       progress=False)
    assert 0.2 < res.mean <= 1.0 and res.ci95 > 0
