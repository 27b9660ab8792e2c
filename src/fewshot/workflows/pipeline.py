"""The main job: prepare -> train -> evaluate -> export -> a live service check -> the photos bundle and
its service check -> distillation, from one config."""

from __future__ import annotations

import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.artifacts.export import export_run
from fewshot.artifacts.manifest import Manifest
from fewshot.artifacts.photos import (
    DEFAULT_VARIANT,
    build_photos_bundle,
    cifar10_zip,
    photos_unavailable,
    teach_and_query_photos,
)
from fewshot.artifacts.zoo import get_entry
from fewshot.config import RunConfig, load_config
from fewshot.config.sections import TeacherConfig
from fewshot.distill import distill
from fewshot.distill.report import load_report, report_dir
from fewshot.errors import ConfigError
from fewshot.io import atomic_write_json
from fewshot.service.smoke import service_smoke_check
from fewshot.training.data import RunData, images_by_class, load_run_data
from fewshot.training.loop import train
from fewshot.training.protocol import evaluate_run


def distill_stage(config: RunConfig, data: RunData, *, progress: bool = True) -> dict[str, Any]:
    """Distil the run just trained into the student of `config.pipeline.distill` (and train the same
    student alone with the same budget); returns the report's accuracy, size and latency rows."""
    assert config.pipeline.distill is not None
    student = load_config(config.pipeline.distill, [f"output_dir={config.output_dir}"])
    if student.distill is None:
        raise ConfigError(f"{config.pipeline.distill} has no distill section; see configs/quickstart_student.yaml")
    d = student.distill.model_copy(update={"teachers": [TeacherConfig(path=str(config.run_dir()))]})
    student = RunConfig.model_validate({**student.to_dict(), "distill": d.model_dump(mode="json")})
    distill(student, data=data if student.data == config.data else None, progress=progress)
    report = load_report(report_dir(student)) or {}
    return {"report": str(report_dir(student)), "rows": [
        {"model": Path(r["name"]).name, "role": r["role"], "latency_ms": round(r["latency_ms"], 4),
         "params": int(r["params"]),
         **{t: f"{100 * a['mean']:.2f} +- {100 * a['ci95']:.2f}" for t, a in r["accuracy"].items()}}
        for r in report.get("rows", [])]}


PHOTOS_TARGET = 25  # of the 30 held-out photos (3 classes x 10) the photos bundle's service check must get right (issue 18)


def photos_stage(out_dir: Path, data_root: Path, *, serve_check: bool = True,
                 variant: str | None = None) -> dict[str, Any]:
    """Build the photos bundle of `variant` (`fewshot.artifacts.photos.build_photos_bundle`; default
    EfficientNet-Lite2, "efficientnet_lite0" for the fast one) into `out_dir` and check it through
    the real service: teach 3 CIFAR-10 classes x 5 photos, classify 10 held-out photos of each.
    Skipped, with the reason, when the `photos` extra or the CIFAR-10 subset is missing."""
    variant = variant or DEFAULT_VARIANT
    reason = photos_unavailable(data_root, variant)
    if reason is not None:
        return {"skipped": reason}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.perf_counter()
    build_photos_bundle(out_dir, variant=variant, data_root=data_root)
    out: dict[str, Any] = {"bundle": str(out_dir), "variant": variant, "build_s": round(time.perf_counter() - t0, 2),
                           "domain": "flags uploads far from ImageNet photos" if Manifest.read(out_dir).domain
                           else "no domain summary (miniImageNet not under the data root)"}
    if serve_check:

        zip_path = cifar10_zip(data_root)
        assert zip_path is not None
        check = service_smoke_check(out_dir, teach_and_query_photos(zip_path), shots=5)
        right = round(check["accuracy"] * check["queries"])
        out["service_check"] = {**check, "right": right, "target_right": PHOTOS_TARGET,
                                "target_met": right >= PHOTOS_TARGET}
    return out


def run_pipeline(config: RunConfig, *, serve_check: bool = True, progress: bool = True,
                 photos: bool = True) -> dict[str, Any]:
    """prepare -> train -> evaluate (protocol) -> export (measured as served) -> start the service and
    classify for real -> the photos bundle and its service check (`photos_stage`; `photos=False`
    skips it) -> distil the trained model into a smaller student (`pipeline.distill`)."""
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
            shutil.rmtree(bundle_dir)

        export_run(config.run_dir(), bundle_dir, data=data)
        summary["bundle"] = str(bundle_dir)
        if serve_check:

            checked = images_by_class(data, ev.split, limit=3)
            foreign = foreign_photos(config.data.data_root())
            summary["service_check"] = service_smoke_check(bundle_dir, checked, foreign=foreign)
            if config.pipeline.zoo_compare:
                summary["zoo_service_check"] = zoo_service_check(config.pipeline.zoo_compare, checked, foreign,
                                                                 summary["service_check"])
        summary["bundle_as_served"] = {k: round(100 * m["served_mean"], 2) for k, m in
                                       Manifest.read(bundle_dir).metrics.items()}
    if photos:
        summary["photos"] = photos_stage(config.run_dir() / "photos_bundle", config.data.data_root(),
                                         serve_check=serve_check)
    if config.pipeline.distill:
        summary["distillation"] = distill_stage(config, data, progress=progress)
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(config.run_dir() / "pipeline_summary.json", summary)
    return summary


def zoo_service_check(name: str, checked: dict[str, np.ndarray], foreign: list[bytes],
                      quick: dict[str, Any]) -> dict[str, Any]:
    """The same live service check on zoo entry `name`, with both models' numbers side by side
    (skipped, with the reason, when the entry is not in the zoo)."""
    try:
        entry = get_entry(name)
    except ConfigError as exc:
        return {"skipped": str(exc)}
    check = service_smoke_check(entry.bundle, checked, foreign=foreign)
    keys = ("accuracy", "top1_accuracy_ignoring_unknown", "rejected_as_unknown", "classify_median_ms")
    return {"entry": f"zoo:{name}", **check,
            "side_by_side": {k: {"trained_here": quick.get(k), f"zoo:{name}": check.get(k)} for k in keys},
            "card": {r["key"]: f"{100 * r['mean']:.2f} +- {100 * r['ci95']:.2f}" for r in entry.card()["results"]}}


def foreign_photos(data_root: Path, n: int = 20) -> list[bytes]:
    """Up to `n` CIFAR-10 test JPEGs (two per class) from `<data_root>/cifar10-subset`, if present:
    colour photos the service check sends to a character model, expecting them flagged."""
    path = data_root / "cifar10-subset" / "cifar10_subset.zip"
    if not path.is_file():
        return []
    with zipfile.ZipFile(path) as z:
        names = sorted(m for m in z.namelist() if "/test/" in m and m.endswith(".jpg"))
        by_class: dict[str, list[str]] = {}
        for m in names:
            by_class.setdefault(m.split("/")[-2], []).append(m)
        picked = [m for ms in by_class.values() for m in ms[:2]][:n]
        return [z.read(m) for m in picked]
