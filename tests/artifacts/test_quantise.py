"""int8 bundles: quantised on calibration images, measured as served against fp32, refused when
they lose too much, served by the loaded bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from artifact_helpers import export_tiny

from fewshot.artifacts.bundle import INT8_ONNX, ONNX, load_bundle
from fewshot.artifacts.embedders import Embedder
from fewshot.artifacts.quantise import (
    Int8Refused,
    TooFewCalibrationImages,
    calibration_sample,
    episode_evaluator,
    quantise_bundle,
)
from fewshot.data.imageio import Preprocessing, model_input
from fewshot.decision import DecisionRule


def labelled_blobs(n_classes: int = 5, per_class: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Class k: a dark disc around a class-specific centre, with jittered centre and radius."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    out = {}
    for k in range(n_classes):
        cy, cx = 7 + 14 * (k % 2), 5 + 4.5 * k
        imgs = np.full((per_class, 1, 28, 28), 255, np.uint8)
        for i in range(per_class):
            y, x, r = cy + rng.normal(0, 1), cx + rng.normal(0, 1), rng.uniform(3, 6)
            imgs[i, 0][(yy - y) ** 2 + (xx - x) ** 2 < r * r] = 0
        out[f"class{k}"] = imgs
    return out


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("int8") / "fp32")


def evaluator() -> object:
    return episode_evaluator(labelled_blobs(), DecisionRule("prototype", "euclidean"), way=3, shot=2, query=5,
                             episodes=40, seed=3, name="blobs_3w2s")


def calibration_images(n: int = 48) -> np.ndarray:
    return calibration_sample(labelled_blobs(seed=1), n, np.random.default_rng(0))


def test_int8_bundle_is_served_and_records_the_accuracy_it_serves(fp32_bundle: Path, tmp_path: Path) -> None:
    evaluate = evaluator()
    out = quantise_bundle(fp32_bundle, calibration_images(), evaluate, out_dir=tmp_path / "int8")  # type: ignore[arg-type]
    bundle = load_bundle(out)  # verifies hashes, fp32 parity and the int8 reference embeddings
    dep = bundle.manifest.deployment
    assert dep is not None and dep["served_model"] == INT8_ONNX and bundle.onnx_path == out / INT8_ONNX
    acc = dep["int8"]["accuracy"]["blobs_3w2s"]
    # the number in the manifest is what the loaded (served) embedder scores on the same episodes
    assert evaluate(bundle.onnx_embedder)["blobs_3w2s"] == pytest.approx(acc["int8"])  # type: ignore[operator]
    assert acc["drop"] == pytest.approx(acc["fp32"] - acc["int8"]) and acc["drop"] <= 0.01
    assert dep["int8"]["calibration_images"] == 48 and dep["int8"]["format"] == "QDQ"
    # the served model is the quantised graph, not the fp32 one
    ops = {n.op_type for n in __import__("onnx").load(str(out / INT8_ONNX)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    x = model_input(calibration_images(4), Preprocessing("L", 28))
    int8_out = ort.InferenceSession(str(out / INT8_ONNX)).run(None, {"images": x})[0]
    fp32_out = ort.InferenceSession(str(out / ONNX)).run(None, {"images": x})[0]
    served = bundle.onnx_embedder.embed(calibration_images(4))
    assert np.abs(served - int8_out).max() < 1e-5 and np.abs(served - fp32_out).max() > 1e-5
    # another identity: a store filled with fp32 embeddings is not mixed with int8 ones
    fp32_id = json.loads((fp32_bundle / "manifest.json").read_text())["bundle_id"]
    assert bundle.bundle_id != fp32_id and dep["int8"]["fp32_bundle_id"] == fp32_id


def test_int8_losing_more_than_a_point_is_refused_unless_forced(fp32_bundle: Path, tmp_path: Path) -> None:
    served_scores = iter([0.90, 0.85])  # fp32 first, then int8: 5 points lost

    def evaluate(embedder: Embedder) -> dict[str, float]:
        return {"test_5w1s": next(served_scores)}

    with pytest.raises(Int8Refused) as err:
        quantise_bundle(fp32_bundle, calibration_images(), evaluate, out_dir=tmp_path / "bad")
    msg = str(err.value)
    assert "85.00%" in msg and "90.00%" in msg and "5.00 points" in msg and "--force" in msg and "48" in msg
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())  # no temporary left behind
    served_scores = iter([0.90, 0.85])
    out = quantise_bundle(fp32_bundle, calibration_images(), evaluate, out_dir=tmp_path / "forced", force=True)
    record = load_bundle(out).manifest.deployment["int8"]  # type: ignore[index]
    assert record["forced"] is True and record["accuracy"]["test_5w1s"]["drop"] == pytest.approx(0.05)


def test_too_few_calibration_images_name_the_count_and_the_fix(fp32_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(TooFewCalibrationImages, match=r"has 31 images but needs at least 32.*more images"):
        quantise_bundle(fp32_bundle, calibration_images(31), evaluator(), out_dir=tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(TooFewCalibrationImages, match=r"has 40 images but needs at least 100 \(you asked for 100\)"):
        quantise_bundle(fp32_bundle, calibration_images(40), evaluator(), out_dir=tmp_path / "b",  # type: ignore[arg-type]
                        requested=100)
    assert not list(tmp_path.iterdir())


def test_calibration_sample_spreads_over_classes_without_repeats() -> None:
    by_class = {f"c{k}": np.full((6, 1, 2, 2), k, np.uint8) for k in range(4)}
    picked = calibration_sample(by_class, 8, np.random.default_rng(0))
    assert picked.shape == (8, 1, 2, 2)
    assert sorted(np.bincount(picked[:, 0, 0, 0], minlength=4)) == [2, 2, 2, 2]
    assert len(calibration_sample(by_class, 100, np.random.default_rng(0))) == 24  # every image, once
