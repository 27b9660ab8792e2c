"""The main job: prepare -> train -> evaluate -> export -> a live service check, from one config."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fewshot.config import RunConfig
from fewshot.io import atomic_write_json
from fewshot.training.data import RunData, load_run_data


def images_by_class(data: RunData, split: str, *, limit: int | None = None) -> dict[str, np.ndarray]:
    """Unrotated images of each class of `split`: name -> uint8 (n, C, H, W)."""
    out: dict[str, np.ndarray] = {}
    for cid in dict.fromkeys(int(i) for i in data.splits[split].class_ids):
        out[data.cache.classes[cid].name] = np.asarray(data.cache.class_images(cid))
        if limit is not None and len(out) >= limit:
            break
    return out


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
        from fewshot.deploy import export_run

        export_run(config.run_dir(), bundle_dir, data=data)
        summary["bundle"] = str(bundle_dir)
        if serve_check:
            from fewshot.service.smoke import service_smoke_check

            summary["service_check"] = service_smoke_check(bundle_dir, images_by_class(data, ev.split, limit=3))
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(config.run_dir() / "pipeline_summary.json", summary)
    return summary
