"""The teach page's "Under the hood" panel: how long GET /workspaces/{ws}/insight takes after a
change, at 5 / 20 / 50 classes x 10 images (target: the panel updates within 200 ms of teaching).

For each model (the embedding size of the served bundles: "characters" Conv-4 64-d with the
Euclidean prototype rule, "photos" EfficientNet-Lite0 1280-d with the cosine prototype rule) a real
uvicorn server on loopback serves a workspace whose classes hold synthetic clustered embeddings
written straight into its store (the insight route never runs the embedder). Measured:
  * cold: one example is added to a class (a new workspace version), then GET /insight, client-side
    wall time: the recogniser's re-sync, the stored-examples read, leave-one-out, JSON and HTTP;
  * warm: GET /insight again at the same version (the cached answer);
  * compute: `workspace_insight` alone on the same embeddings, in process; for the prototype head
    and, for comparison, the probe head (k-fold refits; 3 repetitions).

    python benchmarks/bench_insight.py [--photos-bundle DIR] [--out benchmarks/results/insight.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from fewshot.decision import DecisionRule, OpenSetRule, ServedDecision, check_metric
from fewshot.service.app import create_app
from fewshot.service.insight import workspace_insight
from fewshot.service.settings import ServiceSettings
from fewshot.service.smoke import live_server
from fewshot.service.store import NewExample

ADMIN = "bench-insight-admin"
PER_CLASS = 10


def characters_bundle(out: Path) -> Path:
    """Untrained Conv-4 (28x28 grayscale, 64-d): timing does not depend on the weights."""
    from fewshot.artifacts import export_bundle
    from fewshot.backbones import create_backbone
    from fewshot.data.imageio import Preprocessing

    backbone = create_backbone("conv4", in_channels=1, image_size=28, generator=torch.Generator().manual_seed(0))
    samples = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
    return export_bundle(backbone, out, preprocessing=Preprocessing("L", 28), source={"run": "bench", "name": "characters"},
                         metrics={}, data_fingerprint="synthetic", calibration=None, sample_images=samples)


def photos_bundle(out: Path) -> Path:
    """The photos bundle from the shipped EfficientNet-Lite0 weights (no calibration; synthetic parity)."""
    from fewshot.artifacts.photos import build_photos_bundle

    return build_photos_bundle(out, data_root=out.parent / "no-data", calibration_per_class=0)


def clustered(rng: np.random.Generator, n_classes: int, dim: int, per_class: int) -> np.ndarray:
    """(n_classes, per_class, dim) float32: non-negative features scattered around per-class centres."""
    centres = np.abs(rng.standard_normal((n_classes, 1, dim))) * 2.0
    return np.abs(centres + rng.standard_normal((n_classes, per_class, dim))).astype(np.float32)


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, format="PNG")
    return buf.getvalue()


def median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 2)


def p90_ms(xs: list[float]) -> float:
    return round(1000 * float(np.percentile(xs, 90)), 2)


def bench_http(base: str, app: Any, model: str, n_classes: int, reps: int, seed: int) -> dict[str, Any]:
    """cold / warm GET /insight timings of one workspace of `n_classes` x PER_CLASS stored embeddings."""
    with httpx.Client(base_url=base, timeout=60.0) as client:
        r = client.post("/workspaces", json={"name": f"bench {n_classes}", "model": model},
                        headers={"Authorization": f"Bearer {ADMIN}"})
        r.raise_for_status()
        ws, key = r.json()["id"], r.json()["api_key"]
        served = app.state.service.models.get(model)
        store, dim = app.state.service.store, served.recogniser.dim
        rng = np.random.default_rng(seed)
        png = tiny_png()
        class_ids = [store.add_class(ws, f"class {c}", [NewExample(e, png) for e in emb])[0].id
                     for c, emb in enumerate(clustered(rng, n_classes, dim, PER_CLASS))]
        headers = {"Authorization": f"Bearer {key}"}
        client.get(f"/workspaces/{ws}/insight", headers=headers).raise_for_status()  # first load of the memory
        cold, warm = [], []
        for i in range(reps):
            extra = clustered(rng, 1, dim, 1)[0]
            store.add_examples(ws, class_ids[i % n_classes], [NewExample(extra[0], png)])
            t0 = time.perf_counter()
            r = client.get(f"/workspaces/{ws}/insight", headers=headers)
            cold.append(time.perf_counter() - t0)
            r.raise_for_status()
            t0 = time.perf_counter()
            client.get(f"/workspaces/{ws}/insight", headers=headers).raise_for_status()
            warm.append(time.perf_counter() - t0)
        body = r.json()
        assert len(body["classes"]) == n_classes and body["evaluated"] >= n_classes * PER_CLASS
        return {"cold_median_ms": median_ms(cold), "cold_p90_ms": p90_ms(cold), "warm_median_ms": median_ms(warm),
                "response_bytes": len(r.content), "reps": reps}


def bench_compute(dim: int, metric: str, n_classes: int, head: str, reps: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = clustered(rng, n_classes, dim, PER_CLASS).reshape(-1, dim)
    y = np.repeat(np.arange(n_classes), PER_CLASS)
    ids = tuple(f"cls_{c}" for c in range(n_classes))
    m = check_metric(metric)
    rule = ServedDecision(DecisionRule("probe" if head == "logistic" else "prototype", m), OpenSetRule("spread", m, 1.0))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        workspace_insight(1, ids, ids, x, y, rule)
        times.append(time.perf_counter() - t0)
    return {f"{head}_compute_median_ms": median_ms(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos-bundle", type=Path, help="an existing photos bundle (default: build one in a temp dir)")
    ap.add_argument("--classes", default="5,20,50")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/insight.json"))
    args = ap.parse_args()
    counts = [int(c) for c in args.classes.split(",")]
    torch.set_num_threads(1)  # as `fewshot serve` runs
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        chars = characters_bundle(t / "characters")
        photos = args.photos_bundle or photos_bundle(t / "photos")
        settings = ServiceSettings(bundle_path=f"characters={chars}", extra_bundles=(f"photos={photos}",),
                                   db_url=f"sqlite:///{t / 'insight.db'}", admin_key=ADMIN, torch_threads=1)
        app = create_app(settings)
        with live_server(app) as base:
            for model, dim, metric in (("characters", 64, "euclidean"), ("photos", 1280, "cosine")):
                for seed, k in enumerate(counts):
                    row: dict[str, Any] = {"model": model, "dim": dim, "metric": metric, "classes": k,
                                           "images": k * PER_CLASS}
                    row.update(bench_http(base, app, model, k, args.reps, seed))
                    row.update(bench_compute(dim, metric, k, "prototype", args.reps, seed))
                    row.update(bench_compute(dim, metric, k, "logistic", 3, seed))
                    rows.append(row)
                    print(f"  {model} {k} classes: cold {row['cold_median_ms']} ms", flush=True)
    print("\n| model | D | classes x images | GET /insight after a change: median (p90) ms | cached ms | "
          "compute, prototype LOO ms | compute, probe 5-fold ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dim']} | {r['classes']} x {PER_CLASS} | {r['cold_median_ms']} ({r['cold_p90_ms']}) | "
              f"{r['warm_median_ms']} | {r['prototype_compute_median_ms']} | {r['logistic_compute_median_ms']} |")
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "date": time.strftime("%Y-%m-%d"), "per_class": PER_CLASS,
            "target_ms": 200}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
