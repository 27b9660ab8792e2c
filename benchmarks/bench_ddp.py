"""Data-parallel scaling: one process against `torchrun --nproc-per-node N` on the same config.

Both runs train the same global work (`train.steps` x `train.meta_batch` episodes, the same
episodes), so their validation curves should agree; the table gives training throughput
(episodes/s, from the metrics' elapsed time at the last step, before its validation), the speedup
and scaling efficiency (speedup / N), and the wall time (training + validation, as a user waits
for it) until validation accuracy first reaches the lower of the two runs' best.

    python benchmarks/bench_ddp.py [--nproc 2] [--steps 300] [--out benchmarks/results/ddp.json]

One process keeps torch's default thread count; torchrun gives each rank one thread
(OMP_NUM_THREADS=1), so on a 2-core CPU both use both cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"


def overrides(args: argparse.Namespace, name: str) -> list[str]:
    return [f"name={name}", f"output_dir={args.runs}", f"train.steps={args.steps}", f"train.meta_batch={args.meta_batch}",
            f"train.val_every={args.val_every}", f"train.checkpoint_every={args.steps}", "train.val_episodes=200",
            "train.precision=fp32"]


def launch(args: argparse.Namespace, nproc: int) -> dict[str, Any]:
    name = f"ddp-{nproc}proc"
    base = ["-m", "fewshot", "train", str(CONFIG), *overrides(args, name), "--no-resume"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if nproc == 1:
        cmd = [sys.executable, *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *base]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    run = Path(args.runs) / name
    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    curve = [(int(r["step"]), float(r["elapsed_s"]), float(r["val_acc"])) for r in rows if r.get("val_acc")]
    last = rows[-1]
    train_s = float(last["elapsed_s"]) - validation_seconds(rows)
    episodes = int(last["step"]) * args.meta_batch
    return {"nproc": nproc, "command": " ".join(cmd[1:]), "process_wall_s": round(wall, 2),
            "train_s": round(train_s, 2), "episodes": episodes, "episodes_per_s": round(episodes / train_s, 3),
            "curve": curve, "best_val_acc": max(a for _, _, a in curve)}


def validation_seconds(rows: list[dict[str, str]]) -> float:
    """Time spent in validations before the last step: the gap after each validated step beyond
    the median gap between plain steps."""
    t = [float(r["elapsed_s"]) for r in rows]
    gaps = [b - a for a, b in zip(t, t[1:])]
    plain = sorted(g for g, r in zip(gaps, rows) if not r.get("val_acc"))
    typical = plain[len(plain) // 2] if plain else 0.0
    return sum(g - typical for g, r in zip(gaps, rows) if r.get("val_acc"))


def time_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    return next((t for _, t, a in curve if a >= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--meta-batch", type=int, default=2)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--runs", default="runs/bench_ddp")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddp.json"))
    args = p.parse_args()
    one, many = launch(args, 1), launch(args, args.nproc)
    target = min(one["best_val_acc"], many["best_val_acc"])
    speedup = many["episodes_per_s"] / one["episodes_per_s"]
    result = {
        "config": str(CONFIG.relative_to(ROOT)), "overrides": overrides(args, "<name>"),
        "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        + ("CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"),
        "date": time.strftime("%Y-%m-%d"), "runs": [one, many], "speedup": round(speedup, 3),
        "scaling_efficiency": round(speedup / args.nproc, 3), "target_val_acc": target,
        "time_to_target_s": {str(r["nproc"]): time_to(r["curve"], target) for r in (one, many)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n| processes | episodes/s (training) | best val acc | wall s to val >= {target:.4f} |")
    print("|---|---|---|---|")
    for r in (one, many):
        print(f"| {r['nproc']} | {r['episodes_per_s']:.2f} | {r['best_val_acc']:.4f} | "
              f"{result['time_to_target_s'][str(r['nproc'])]} |")
    print(f"\nspeedup {speedup:.2f}x, scaling efficiency {speedup / args.nproc:.0%} ({args.nproc} processes); "
          f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()
