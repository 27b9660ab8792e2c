"""`run_pipeline`, the main job, end to end on a tiny synthetic collection: train -> evaluate ->
export (measured as served) -> a live service check over real HTTP -> the summary it writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from synthetic_runs import config, run_data, synthetic_cache

import fewshot.workflows.pipeline as pipeline
from fewshot.artifacts.bundle import Manifest


def test_run_pipeline_trains_exports_serves_and_writes_its_summary(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = run_data(synthetic_cache(tmp_path / "c", n_classes=30, per_class=10))
    loaded: list[object] = []
    monkeypatch.setattr(pipeline, "load_run_data", lambda cfg, progress=True: loaded.append(cfg) or data)
    cfg = config(tmp_path, name="tiny-pipeline", steps=30, val_every=10, lr=3e-3,
                 extra={"eval": {"episodes": 600, "way": 3, "shot": 2, "query": 5},
                        "export": {"calibration_episodes": 20, "bn_episodes": 5},
                        "data": {"image_size": 16, "root": str(tmp_path / "no-data-here")}})

    summary = pipeline.run_pipeline(cfg, serve_check=True, progress=False, photos=False)

    assert loaded == [cfg.data]
    assert json.loads((cfg.run_dir() / "pipeline_summary.json").read_text()) == summary
    m = re.fullmatch(r"3-way 2-shot \(any, 600 episodes, seed 1234\): (\d+\.\d\d)% \+- \d+\.\d\d%", summary["evaluation"])
    assert m is not None, summary["evaluation"]
    assert float(m.group(1)) > 100 / 3 + 10  # learned something on the test classes, which it never trained on
    bundle = Path(summary["bundle"])
    assert (bundle / "model.onnx").is_file()
    assert summary["bundle_as_served"] == {k: round(100 * m["served_mean"], 2)
                                           for k, m in Manifest.read(bundle).metrics.items()}
    check = summary["service_check"]
    assert check["queries"] > 0 and 0.0 <= check["accuracy"] <= 1.0
    assert "photos" not in summary and "distillation" not in summary and "zoo_service_check" not in summary
    assert summary["total_s"] >= summary["train_s"] > 0
