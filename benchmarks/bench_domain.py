"""Does the bundle know its training domain? Flag rates of `DomainSummary.check` on real data.

The summary is built as export would: the bundle's model (ONNX Runtime, as served) embeds the
unrotated training-split images from the packed cache (a random 20% held out calibrates the
embedding threshold at its 99.5th percentile); image statistics come from training files as
uploaded (`upload_statistics`) or, for comparison, from the cached model inputs
(`model_image_statistics`, what export can do without the original files). Then every image is
decoded as the service decodes an upload (`open_image` -> `to_array` for the model, `small_rgb` ->
`image_statistics` for the statistics) and checked:

* Omniglot test-split characters from the original PNGs: every flag is a false alarm;
* CIFAR-10 subset and miniImageNet JPEGs: every miss is a photo silently classified;
* synthetic: blank white / black / grey, uniform noise (grayscale and colour).

    FEWSHOT_DATA=../shared/datasets python benchmarks/bench_domain.py --bundle runs/quickstart/bundle \\
        --also 'runs/bench-export/*/bundle' --out benchmarks/results/domain.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewshot.artifacts.bundle import Bundle, load_bundle
from fewshot.artifacts.domain import (
    DomainSummary,
    ImageStats,
    image_statistics,
    model_image_statistics,
    small_rgb,
    summarise_domain,
    upload_statistics,
)
from fewshot.config import load_config
from fewshot.data.imageio import Preprocessing, open_image, to_array
from fewshot.data.sources import OmniglotSource
from fewshot.training.data import RunData, images_by_class, load_run_data

ROOT = Path(__file__).resolve().parents[1]
Decoded = tuple[np.ndarray, list[ImageStats]]  # model inputs uint8 (N, C, H, W), their upload stats


def wait_for(manifest: Path, timeout_s: float) -> None:
    t0 = time.monotonic()
    while not manifest.is_file():
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"{manifest} did not appear in {timeout_s:.0f} s; run ./scripts/run.sh first")
        time.sleep(10)


def decode_all(blobs: list[bytes], pre: Preprocessing) -> Decoded:
    """As the service decodes uploads: the model input and the statistics of the same opened image."""
    x, stats = [], []
    for b in blobs:
        img = open_image(b)
        x.append(to_array(img, pre))
        stats.append(image_statistics(small_rgb(img)))
    return np.stack(x), stats


def split_files(data: RunData, split: str) -> list[str]:
    """Source ids (cache `files`) of the unrotated images of `split`'s classes."""
    out: list[str] = []
    for cid in dict.fromkeys(int(i) for i in data.splits[split].class_ids):
        c = data.cache.classes[cid]
        out += data.cache.files[c.start:c.start + c.count]
    return out


def omniglot_reader(data_root: Path) -> Callable[[str], bytes]:
    source = OmniglotSource(data_root)
    by_id = {e.source_id: e for e in source.entries()}
    return lambda source_id: source.read(by_id[source_id])


def zip_jpegs(path: Path, n: int | None, rng: np.random.Generator) -> list[bytes]:
    with zipfile.ZipFile(path) as z:
        names = sorted(m for m in z.namelist() if m.lower().endswith(".jpg"))
        if n is not None and n < len(names):
            names = [names[i] for i in sorted(rng.choice(len(names), n, replace=False))]
        return [z.read(m) for m in names]


def synthetic(pre: Preprocessing, n: int, rng: np.random.Generator) -> dict[str, Decoded]:
    """105x105 images (Omniglot's size) as a user might send them."""
    def pack(arrays: list[np.ndarray]) -> Decoded:
        imgs = [Image.fromarray(a) for a in arrays]
        return np.stack([to_array(i, pre) for i in imgs]), [image_statistics(small_rgb(i)) for i in imgs]

    flat = {"blank white": 255, "blank black": 0, "blank grey": 128}
    out = {k: pack([np.full((105, 105), v, np.uint8)] * 4) for k, v in flat.items()}
    out["noise (gray)"] = pack([rng.integers(0, 256, (105, 105), dtype=np.uint8) for _ in range(n)])
    out["noise (colour)"] = pack([rng.integers(0, 256, (105, 105, 3), dtype=np.uint8) for _ in range(n)])
    return out


def evaluation_sets(data: RunData, data_root: Path, pre: Preprocessing, n: int,
                    rng: np.random.Generator) -> dict[str, Decoded]:
    read = omniglot_reader(data_root)
    test = split_files(data, "test")
    pick = [test[i] for i in sorted(rng.choice(len(test), min(n, len(test)), replace=False))]
    sets = {"omniglot test (false alarms)": decode_all([read(f) for f in pick], pre),
            "cifar-10 subset": decode_all(zip_jpegs(data_root / "cifar10-subset" / "cifar10_subset.zip", None, rng), pre),
            "miniimagenet": decode_all(zip_jpegs(data_root / "miniimagenet" / "miniimagenet84.zip", n, rng), pre)}
    return {**sets, **synthetic(pre, 200, rng)}


def embed(bundle: Bundle, x: np.ndarray) -> np.ndarray:
    return np.concatenate([bundle.onnx_embedder.embed(x[i:i + 512]) for i in range(0, len(x), 512)])


def rates(summary: DomainSummary, z: np.ndarray, stats: list[ImageStats]) -> dict[str, Any]:
    both, emb = summary.check(z, stats), summary.check(z, None)
    reasons = Counter(r for v in both for r in v.reasons)
    return {"n": len(z), "flagged": float(np.mean([v.out_of_domain for v in both])),
            "embedding_only": float(np.mean([v.out_of_domain for v in emb])),
            "image_stats_only": float(np.mean([bool(summary.image_reasons(s)) for s in stats])),
            "score_median": float(np.median([v.score for v in both])),
            "reasons": dict(reasons.most_common())}


def build(bundle: Bundle, train: np.ndarray, stats: list[ImageStats], source: str, seed: int) -> DomainSummary:
    pre = bundle.preprocessing
    return summarise_domain(bundle.onnx_embedder, train, stats, mode=pre.mode, size=pre.size,
                            rng=np.random.default_rng(seed), trained_on="Omniglot characters",
                            image_stats_from=source)


def timing(sets: dict[str, Decoded], data_root: Path, summary: DomainSummary, bundle: Bundle) -> dict[str, float]:
    """Per-image cost on the service path: small_rgb + image_statistics, and check (batch of 1)."""
    blobs = zip_jpegs(data_root / "miniimagenet" / "miniimagenet84.zip", 200, np.random.default_rng(1))
    imgs = [open_image(b) for b in blobs]
    t0 = time.perf_counter()
    smalls = [small_rgb(i) for i in imgs]
    t1 = time.perf_counter()
    for s in smalls:
        image_statistics(s)
    t2 = time.perf_counter()
    x, st = sets["omniglot test (false alarms)"]
    z = embed(bundle, x[:200])
    t3 = time.perf_counter()
    for i in range(200):
        summary.check(z[i:i + 1], st[i:i + 1])
    t4 = time.perf_counter()
    return {"small_rgb_ms": 1e3 * (t1 - t0) / 200, "image_statistics_ms": 1e3 * (t2 - t1) / 200,
            "check_ms": 1e3 * (t4 - t3) / 200}


def other_bundles(pattern: str | None, train: np.ndarray, stats: list[ImageStats], sets: dict[str, Decoded],
                  seed: int) -> dict[str, Any]:
    """Embedding-only and combined flag rates for other Omniglot bundles (the score's spread)."""
    out: dict[str, Any] = {}
    for path in sorted(glob.glob(str(ROOT / pattern))) if pattern else []:
        b = load_bundle(path, verify_parity=False)
        s = build(b, train, stats, "originals", seed)
        out[str(Path(path).relative_to(ROOT))] = {k: rates(s, embed(b, x), st) for k, (x, st) in sets.items()
                                                  if not k.startswith("blank")}
    return out


def row(name: str, r: dict[str, Any]) -> str:
    top = "; ".join(f"{k} ({v})" for k, v in list(r["reasons"].items())[:2])
    return (f"| {name} | {r['n']} | {100 * r['flagged']:.1f} | {100 * r['image_stats_only']:.1f} | "
            f"{100 * r['embedding_only']:.1f} | {r['score_median']:.2f} | {top} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "runs" / "quickstart" / "bundle")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("FEWSHOT_DATA", ROOT.parent / "shared" / "datasets")))
    p.add_argument("--n-stats", type=int, default=3000, help="training files read for image statistics")
    p.add_argument("--n-eval", type=int, default=3000, help="Omniglot test / miniImageNet images checked")
    p.add_argument("--also", default=None, help="glob (relative to the repo) of more bundles, e.g. 'runs/bench-export/*/bundle'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for the bundle's manifest.json")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "domain.json")
    args = p.parse_args()
    wait_for(args.bundle / "manifest.json", args.wait)

    rng = np.random.default_rng(args.seed)
    bundle = load_bundle(args.bundle)
    run = Path(bundle.manifest.source["run"])
    config = load_config((run if run.is_absolute() else ROOT / run) / "config.yaml")
    data = load_run_data(config.data, progress=False)
    train = np.concatenate(list(images_by_class(data, "train").values()))  # (N, 1, 28, 28), unrotated
    files = split_files(data, "train")
    read = omniglot_reader(args.data)
    picked = [files[i] for i in sorted(rng.choice(len(files), min(args.n_stats, len(files)), replace=False))]
    stats = {"originals": [upload_statistics(read(f)) for f in picked],
             "model inputs": model_image_statistics(train[rng.choice(len(train), args.n_stats, replace=False)])}
    summaries = {src: build(bundle, train, st, src, args.seed) for src, st in stats.items()}
    if bundle.domain is not None:  # what the service applies: the summary export wrote into the bundle
        summaries = {"the bundle's own summary (as served)": bundle.domain, **summaries}
    sets = evaluation_sets(data, args.data, bundle.preprocessing, args.n_eval, rng)
    emb = {k: embed(bundle, x) for k, (x, _) in sets.items()}
    results = {src: {k: rates(s, emb[k], sets[k][1]) for k in sets} for src, s in summaries.items()}

    emb_summary = summaries["originals"].embedding
    print(f"bundle {args.bundle} ({bundle.bundle_id}); summary of {emb_summary.n_fit + emb_summary.n_held_out} of "
          f"{len(train)} training images ({emb_summary.n_held_out} held out), "
          f"{len(json.dumps(summaries['originals'].to_dict()))} bytes of JSON\n")
    for src, res in results.items():
        print(f"{src if src.startswith('the bundle') else 'image statistics from training ' + src}:\n")
        print("| images | n | flagged % | by image statistics % | by embedding % | median score | top reasons |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for name, r in res.items():
            print(row(name, r))
        print()
    cost = timing(sets, args.data, summaries["originals"], bundle)
    print("per image: " + ", ".join(f"{k} {v:.3f}" for k, v in cost.items()))
    others = other_bundles(args.also, train, stats["originals"], sets, args.seed)
    if others:
        print("\nother bundles (image statistics from originals): flagged % / by embedding %\n")
        names = [k for k in sets if not k.startswith("blank")]
        print("| bundle | " + " | ".join(names) + " |")
        print("| --- |" + " ---: |" * len(names))
        for b, res in others.items():
            print(f"| {b} | " + " | ".join(f"{100 * res[k]['flagged']:.1f} / {100 * res[k]['embedding_only']:.1f}"
                                           for k in names) + " |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "bench_domain", "date": date.today().isoformat(), "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "bundle": str(args.bundle), "bundle_id": bundle.bundle_id, "seed": args.seed,
        "n_train_images": len(train), "n_stats": args.n_stats, "summary": summaries["originals"].to_dict(),
        "summary_json_bytes": len(json.dumps(summaries["originals"].to_dict())),
        "results": results, "timing_ms": cost, "other_bundles": others,
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
