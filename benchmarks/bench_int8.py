"""int8 against fp32: CPU latency per image and accuracy on the same episodes, as served.

For each model, `fewshot.artifacts.quantise.quantise_bundle` (ONNX Runtime static quantisation, QDQ)
writes the int8 bundle, measuring fp32 and int8 through ONNX Runtime + the bundle's decision rule
on the same episodes; the latency of both models is then measured side by side in one run.

* photos: the EfficientNet-Lite0 photos bundle (`build_photos_bundle`), calibrated on CIFAR-10 train
  images (`--calibration-per-class` per class, seeded choice), measured on 5-way 5-shot 15-query
  episodes over CIFAR-10 test images (`--test-per-class` per class). Variants: per-channel and
  per-tensor weight scales (`--photo-variants`).
* characters: a trained Omniglot Conv-4 bundle (`--run`, default runs/quickstart with its bundle),
  calibrated on its run's training images, measured on the run's recorded test episodes.

Latency: `OnnxEmbedder` (uint8 in, as the service calls it), batch 1, 2 intra-op threads set on the
SessionOptions; fp32 and int8 alternate in rounds so background load hits both alike; median and
p90 over all calls.

    python benchmarks/bench_int8.py --data ../shared/datasets [--run runs/quickstart]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {"per-channel": {"per_channel": True}, "per-tensor": {"per_channel": False}}


def latency(bundle_dir: Path, image: np.ndarray, *, rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """Per-image latency (ms) of the fp32 and int8 model of an int8 bundle, alternating rounds."""
    from fewshot.artifacts.bundle import INT8_ONNX, ONNX, Manifest
    from fewshot.artifacts.embedders import OnnxEmbedder
    from fewshot.data.imageio import Preprocessing

    m = Manifest.read(bundle_dir)
    pre = Preprocessing.from_dict(m.preprocessing)
    models = {name: OnnxEmbedder(bundle_dir / f, pre, embedding_dim=m.embedding_dim, intra_op_threads=2)
              for name, f in (("fp32", ONNX), ("int8", INT8_ONNX))}
    times: dict[str, list[float]] = {k: [] for k in models}
    for e in models.values():  # warm-up
        for _ in range(5):
            e.embed(image)
    for _ in range(rounds):
        for name, e in models.items():
            for _ in range(calls):
                t = time.perf_counter()
                e.embed(image)
                times[name].append(1000 * (time.perf_counter() - t))
    return {k: {"median_ms": round(float(np.median(v)), 3), "p90_ms": round(float(np.percentile(v, 90)), 3),
                "calls": len(v)} for k, v in times.items()}


def quantise_variants(fp32: Path, calibration: np.ndarray, evaluate: Any, tmp: Path, variants: list[str],
                      image: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    from fewshot.artifacts.bundle import Manifest
    from fewshot.artifacts.quantise import QuantiseConfig, quantise_bundle

    out: dict[str, Any] = {}
    for v in variants:
        t = time.perf_counter()
        b = quantise_bundle(fp32, calibration, evaluate, out_dir=tmp / f"{fp32.name}-{v}", force=True,
                            config=QuantiseConfig(**VARIANTS[v]))
        record = (Manifest.read(b).deployment or {})["int8"]
        lat = latency(b, image, rounds=args.rounds, calls=args.calls)
        out[v] = {"accuracy": record["accuracy"], "latency": lat, "quantise_and_measure_s": round(time.perf_counter() - t, 1),
                  "speedup": round(lat["fp32"]["median_ms"] / lat["int8"]["median_ms"], 2),
                  "int8_mb": round((b / "model.int8.onnx").stat().st_size / 2**20, 2),
                  "fp32_mb": round((b / "model.onnx").stat().st_size / 2**20, 2)}
    return out


def photos(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fewshot.artifacts.photos import PHOTOS_RULE, build_photos_bundle, cifar10_images
    from fewshot.artifacts.quantise import calibration_sample, episode_evaluator

    zip_path = args.data / "cifar10-subset" / "cifar10_subset.zip"
    fp32 = build_photos_bundle(tmp / "photos", variant="efficientnet_lite0", data_root=args.data,
                               calibration_per_class=0, domain_per_class=0)  # Lite2: bench_photos.py
    train = cifar10_images(zip_path, "train", 3 * args.calibration_per_class)
    calibration = calibration_sample(train, 10 * args.calibration_per_class, np.random.default_rng(args.seed))
    test = cifar10_images(zip_path, "test", args.test_per_class)
    evaluate = episode_evaluator(test, PHOTOS_RULE, way=5, shot=5, query=15, episodes=args.episodes,
                                 seed=args.seed, name="cifar10_test_5w5s")
    res = quantise_variants(fp32, calibration, evaluate, tmp, args.photo_variants.split(","),
                            test[next(iter(test))][:1], args)
    return {"calibration_images": len(calibration), "test_images": sum(len(v) for v in test.values()), **res}


def characters(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.export import (
        int8_calibration_images,
        recorded_test_results,
        served_accuracy,
    )
    from fewshot.config import load_config
    from fewshot.training.data import load_run_data

    run = args.run
    fp32 = run / "bundle"
    config = load_config(run / "config.yaml", [f"data.root={args.data}"])
    data = load_run_data(config.data, progress=False)
    calibration = int8_calibration_images(data, 10 * args.calibration_per_class, args.seed)
    evaluate = served_accuracy(recorded_test_results(run), data, load_bundle(fp32).decision_rule)
    res = quantise_variants(fp32, calibration, evaluate, tmp, ["per-channel"], calibration[:1], args)
    return {"run": str(run), "calibration_images": len(calibration), **res}


def table(name: str, res: dict[str, Any]) -> None:
    for v, r in ((k, x) for k, x in res.items() if isinstance(x, dict)):
        for key, a in r["accuracy"].items():
            print(f"| {name} | {v} | {r['latency']['fp32']['median_ms']:.2f} | {r['latency']['int8']['median_ms']:.2f} | "
                  f"{r['speedup']:.2f}x | {100 * a['fp32']:.2f} | {100 * a['int8']:.2f} | {-100 * a['drop']:+.2f} | {key} |")


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """Date, library versions, machine and command of this run."""
    import onnxruntime
    import torch

    versions = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **versions,
            "platform": platform.platform(), "cpus": os.cpu_count(), "command": " ".join(["python", *sys.argv]),
            "seed": args.seed, "episodes": args.episodes, "calibration_per_class": args.calibration_per_class}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSHOT_DATA", ROOT.parent / "shared/datasets")))
    p.add_argument("--run", type=Path, default=ROOT / "runs/quickstart", help="a run with a bundle/ and a test evaluation")
    p.add_argument("--calibration-per-class", type=int, default=20, help="photos: CIFAR-10 train images per class; "
                   "characters: 10x this many training images")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--photo-variants", default="per-channel,per-tensor")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/int8.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        out["photos_efficientnet_lite0"] = photos(args, Path(d))
        if (args.run / "bundle" / "manifest.json").is_file():
            out["characters_conv4"] = characters(args, Path(d))
        else:
            print(f"no bundle under {args.run}; characters skipped")
    print("| model | weights | fp32 ms/image | int8 ms/image | speed-up | fp32 acc % | int8 acc % | int8 - fp32 | episodes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, res in out.items():
        table(name, res)
    out = {"meta": run_meta(args), **out, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nraw: {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
