"""The main job: prepare -> train -> evaluate -> export -> a live service check, from one config."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.config import RunConfig, load_config
from fewshot.errors import CheckpointError
from fewshot.io import atomic_write_json
from fewshot.training.data import RunData, load_run_data
from fewshot.training.protocol import load_results


def images_by_class(data: RunData, split: str, *, limit: int | None = None) -> dict[str, np.ndarray]:
    """Unrotated images of each class of `split`: name -> uint8 (n, C, H, W)."""
    out: dict[str, np.ndarray] = {}
    for cid in dict.fromkeys(int(i) for i in data.splits[split].class_ids):
        out[data.cache.classes[cid].name] = np.asarray(data.cache.class_images(cid))
        if limit is not None and len(out) >= limit:
            break
    return out


def export_run(run_dir: Path, out: Path, *, data: RunData | None = None, seed: int = 0) -> Path:
    """Bundle the best checkpoint of a run: weights, manifest, ONNX (parity-checked), calibration.

    The unknown-class threshold is calibrated on the validation split (never on test classes).
    """
    from fewshot.artifacts.bundle import export_bundle
    from fewshot.artifacts.calibration import calibrate_unknown_threshold
    from fewshot.artifacts.embedders import TorchEmbedder
    from fewshot.training.loop import check_run_dir, load_trained

    if out.exists():
        raise CheckpointError(f"{out} already exists; choose a new bundle folder or delete it")
    config = load_config(check_run_dir(run_dir) / "config.yaml")
    data = data or load_run_data(config.data, progress=False)
    learner, manifest = load_trained(run_dir)
    backbone = learner.backbone.float().eval().to(memory_format=torch.contiguous_format)
    calib_split = "val" if "val" in data.splits else "test"
    by_class = images_by_class(data, calib_split, limit=100)
    pre = data.cache.preprocessing
    embedder = TorchEmbedder(backbone, channels=pre.channels, size=pre.size)
    smallest = min(len(v) for v in by_class.values())
    calibration = calibrate_unknown_threshold(
        embedder, by_class, np.random.default_rng(seed), n_way=max(2, min(5, len(by_class) - 1)),
        n_shot=max(1, min(5, smallest - 1)), n_episodes=config.export.calibration_episodes,
        target_false_accept=config.export.false_accept_rate,
    )
    sample = np.concatenate([v[:2] for v in list(by_class.values())[:16]])
    metrics = {f"{r['split']}_{r['way']}w{r['shot']}s_{r['mode']}": {"mean": r["mean"], "ci95": r["ci95"],
               "episodes": r["episodes"]} for r in load_results(run_dir)}
    return export_bundle(
        backbone, out, preprocessing=pre,
        source={"run": str(run_dir), "name": config.name, "learner": manifest["model"]["learner"],
                "step": manifest["step"], "calibrated_on": f"{data.scheme}/{calib_split}"},
        metrics=metrics, data_fingerprint=data.cache.fingerprint, calibration=calibration.to_dict(),
        sample_images=sample,
    )


def run_pipeline(config: RunConfig, *, serve_check: bool = True, progress: bool = True) -> dict[str, Any]:
    """prepare -> train -> evaluate (protocol) -> export -> start the service and classify for real."""
    from fewshot.training.loop import train
    from fewshot.training.protocol import evaluate_run

    t0 = time.perf_counter()
    summary: dict[str, Any] = {"run": str(config.run_dir())}
    data = load_run_data(config.data, progress=progress)
    summary["prepare_s"] = round(time.perf_counter() - t0, 2)
    result = train(config, data=data, progress=progress)
    summary["train_s"] = round(result.elapsed_s, 2)
    ev = config.eval
    res = evaluate_run(config.run_dir(), way=ev.way, shot=ev.shot, query=ev.query, episodes=ev.episodes,
                       seed=ev.seed, split=ev.split, mode=ev.domain_mode, data=data, progress=progress)
    summary["evaluation"] = res.summary()
    if config.export.enabled:
        bundle_dir = config.run_dir() / "bundle"
        if bundle_dir.exists():
            import shutil

            shutil.rmtree(bundle_dir)
        export_run(config.run_dir(), bundle_dir, data=data)
        summary["bundle"] = str(bundle_dir)
        if serve_check:
            from fewshot.service.smoke import service_smoke_check

            summary["service_check"] = service_smoke_check(bundle_dir, images_by_class(data, ev.split, limit=3))
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(config.run_dir() / "pipeline_summary.json", summary)
    return summary
