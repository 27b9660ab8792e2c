"""`export_run(..., int8=...)`: the int8 model is calibrated on training images, measured on the
run's test episodes beside fp32 (ONNX Runtime + the bundle's rule), and served by the bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_runs import config, run_data, synthetic_cache

from fewshot.artifacts.bundle import INT8_ONNX, load_bundle
from fewshot.artifacts.export import Int8Export, export_run, recorded_test_results, served_accuracy
from fewshot.artifacts.quantise import TooFewCalibrationImages
from fewshot.training.data import RunData
from fewshot.training.loop import train
from fewshot.training.protocol import evaluate_run

pytestmark = pytest.mark.slow  # trains a run and evaluates 600 episodes (~40 s here); the quantisation
# itself is covered fast by tests/artifacts/test_quantise.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunData]:
    tmp = tmp_path_factory.mktemp("int8run")
    data = run_data(synthetic_cache(tmp, n_classes=24, per_class=10))  # 12 training classes: 120 images
    cfg = config(tmp, "protonet", steps=20, val_every=20, batch_size=32, lr=3e-3,
                 extra={"eval": {"episodes": 600, "way": 3, "shot": 2, "query": 5},
                        "export": {"calibration_episodes": 20}})
    train(cfg, data=data, progress=False)
    evaluate_run(cfg.run_dir(), way=3, shot=2, query=5, episodes=600, data=data, progress=False, device="cpu")
    return cfg.run_dir(), data


def test_export_int8_serves_the_model_it_measured(trained: tuple[Path, RunData], tmp_path: Path) -> None:
    run, data = trained
    bundle = load_bundle(export_run(run, tmp_path / "b", data=data, int8=Int8Export(calibration_images=64)))
    dep = bundle.manifest.deployment
    assert dep is not None and bundle.served_model == INT8_ONNX
    record = dep["int8"]
    assert record["calibration_images"] == 64 and "train" in record["calibrated_on"]
    assert record["calibration"] == "open-set rules re-calibrated on the int8 embeddings"
    acc = record["accuracy"]["test_3w2s_any"]
    # fp32 as measured here is the fp32 bundle as served (the number export already recorded) ...
    assert acc["fp32"] == pytest.approx(bundle.manifest.metrics["test_3w2s_any"]["served_mean"])
    # ... and int8 is what the loaded bundle serves on the same episodes
    rule = bundle.decision_rule
    served = served_accuracy(recorded_test_results(run), data, rule)(bundle.onnx_embedder)
    assert served["test_3w2s_any"] == pytest.approx(acc["int8"])
    assert acc["drop"] <= 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # the fp32 scratch bundle is gone


def test_export_int8_with_too_few_training_images(trained: tuple[Path, RunData], tmp_path: Path) -> None:
    run, data = trained
    with pytest.raises(TooFewCalibrationImages, match=r"has 120 images but needs at least 500 \(you asked for 500\)"):
        export_run(run, tmp_path / "b", data=data, int8=Int8Export(calibration_images=500))
    assert not list(tmp_path.iterdir())
