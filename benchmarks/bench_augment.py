"""Cost of the seeded training augmentations on one 128-image batch of 84x84 RGB photos.

Median / p90 milliseconds per batch (uint8 in, uint8 out; `fewshot.episodes.materialise.augment`)
for each augmentation alone and all together, on random pixels (the cost does not depend on the
content), with torch's intra-op threads set by `--threads` (grid_sample of the resized crop uses
them) and recorded.

    python benchmarks/bench_augment.py [--threads 1] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fewshot.episodes.materialise import Augment, augment

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "crop_pad 8": Augment(crop_pad=8),
    "hflip": Augment(hflip=True),
    "random resized crop (0.08-1)": Augment(rrc_scale=(0.08, 1.0)),
    "colour jitter 0.4": Augment(color_jitter=0.4),
    "colour jitter 0.4 + hue 0.1": Augment(color_jitter=0.4, hue_jitter=0.1),
    "rrc + hflip + jitter 0.4 + hue 0.1": Augment(rrc_scale=(0.08, 1.0), hflip=True, color_jitter=0.4, hue_jitter=0.1),
}


def time_ms(aug: Augment, images: np.ndarray, runs: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    for _ in range(3):
        augment(images, aug, rng)
    ms = []
    for _ in range(runs):
        t = time.perf_counter()
        augment(images, aug, rng)
        ms.append(1e3 * (time.perf_counter() - t))
    ms.sort()
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/augment.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 3, args.size, args.size), dtype=np.uint8)
    print(f"augment(), {args.batch} x 3 x {args.size} x {args.size} uint8, {args.runs} runs, "
          f"{args.threads} torch thread(s)")
    print(f"  {'augmentation':38s} {'median ms':>10s} {'p90 ms':>8s}")
    rows = {}
    for name, aug in SETTINGS.items():
        rows[name] = time_ms(aug, images, args.runs)
        print(f"  {name:38s} {rows[name]['median_ms']:10.2f} {rows[name]['p90_ms']:8.2f}")
    out = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
                    "numpy": np.__version__, "python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count(), "threads": args.threads, "command": " ".join(["python", *sys.argv]),
                    "batch": args.batch, "size": args.size, "runs": args.runs},
           "per_batch": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nraw: {args.out}")


if __name__ == "__main__":
    main()
