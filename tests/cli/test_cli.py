"""The `fewshot` command end to end on a tiny image folder made in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewshot.cli import main


def make_folder(root: Path, domains: int = 3, classes: int = 6, per_class: int = 8, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for d in range(domains):
        for c in range(classes):
            pattern = rng.random((size, size)) < 0.3
            folder = root / f"dom{d}" / f"cls{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                noise = rng.random((size, size)) < 0.05
                Image.fromarray(((pattern ^ noise) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    (root / "dom0" / "cls0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    make_folder(tmp_path / "data" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSHOT_DATA", str(tmp_path / "data"))
    return tmp_path


def test_prepare_inspect_train_evaluate_compare_export(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--dataset", "tiny", "--size", "16", "--report", "report.json"]) == 0
    out = capsys.readouterr().out
    assert "| **files** |" in out and "145" in out  # 144 images + 1 broken file, all accounted for
    report = json.loads((workdir / "report.json").read_text())
    assert json.dumps(report).count("broken.png") >= 1

    assert main(["inspect", "--dataset", "tiny", "--size", "16", "--split", "domains", "--way", "3",
                 "--query", "2", "--out", "ep.png"]) == 0
    out = capsys.readouterr().out
    assert "leakage check: passed" in out and (workdir / "ep.png").stat().st_size > 0

    cfg = workdir / "c.yaml"
    cfg.write_text(
        "name: tiny\ndata: {dataset: tiny, image_size: 16, split: classes}\n"
        "model: {backbone: conv4, backbone_args: {hidden: 8}}\n"
        "train: {steps: 4, way: 3, shot: 1, query: 2, val_every: 2, val_episodes: 5, val_way: 2, val_query: 2,"
        " checkpoint_every: 2, precision: fp32, device: cpu}\n"
        "eval: {way: 3, shot: 2, query: 2, episodes: 600, seed: 7}\n"
    )
    assert main(["train", str(cfg)]) == 0
    assert main(["evaluate", "runs/tiny"]) == 0  # the run's own eval section when nothing is given
    assert "3-way 2-shot (any, 600 episodes, seed 7)" in capsys.readouterr().out
    assert main(["evaluate", "runs/tiny", "--way", "2", "--shot", "1", "--query", "2", "--episodes", "600",
                 "--per-domain"]) == 0
    out = capsys.readouterr().out
    assert "2-way 1-shot (any, 600 episodes, seed 7)" in out and "dom" in out  # the seed of its eval section
    assert main(["compare", "runs/tiny", "--out", "cmp.png"]) == 0
    assert "| tiny | protonet | conv4 |" in capsys.readouterr().out
    assert main(["export", "runs/tiny", "bundle"]) == 0
    manifest = json.loads((workdir / "bundle" / "manifest.json").read_text())
    assert manifest["embedding_dim"] == 8 and (workdir / "bundle" / "model.onnx").is_file()
    views = manifest["deployment"]["views"]  # chosen on validation episodes: shifted views, no mirror for grey
    assert set(views["accuracy"]) == {"none", "shift4"} and views["views"] == manifest["decision"]["rule"]["views"]
    assert main(["evaluate", "bundle", "--way", "2", "--query", "2", "--episodes", "600"]) == 0  # as served
    assert "bundle as served (ONNX Runtime + its decision rule): 2-way 1-shot (any, 600 episodes, seed 1234)" in \
        capsys.readouterr().out


def test_errors_are_reported_with_exit_code_2(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--dataset", "missing-folder"]) == 2
    assert "missing-folder" in capsys.readouterr().err
    assert main(["prepare", "--dataset", "tiny", "--min-images", "0"]) == 2
    assert "data.min_images_per_class" in capsys.readouterr().err
    assert main(["train", "nope.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "runs/none", "--way", "5"]) == 2
    assert "runs/none" in capsys.readouterr().err
