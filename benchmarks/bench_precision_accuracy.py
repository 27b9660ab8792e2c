"""Does the CPU fast path (bf16 autocast + channels-last) keep accuracy? Side by side with fp32.

Trains the same ProtoNet config twice, identical seeds and episodes, once with the automatic
precision policy and once forced to fp32, then evaluates both on the same 600+ fixed-seed test
episodes (Vinyals split). Reports training throughput and accuracy with 95% CI for each.

    python benchmarks/bench_precision_accuracy.py --steps 300 --out benchmarks/results/precision_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fewshot.config import load_config
from fewshot.precision import select_precision
from fewshot.training.data import load_run_data
from fewshot.training.loop import train
from fewshot.training.protocol import evaluate_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--output-dir", default="runs/bench-precision")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/precision_accuracy.json"))
    args = ap.parse_args()
    rows = []
    data = None
    for precision in ("auto", "fp32"):
        cfg = load_config(args.config, [f"name=precision-{precision}", f"output_dir={args.output_dir}",
                                        f"train.steps={args.steps}", f"train.precision={precision}",
                                        f"train.val_every={args.steps}", "train.device=cpu"])
        data = data or load_run_data(cfg.data, progress=False)
        t0 = time.perf_counter()
        result = train(cfg, data=data, progress=False, resume=False)
        seconds = time.perf_counter() - t0
        ev = evaluate_run(result.run_dir, way=cfg.eval.way, shot=cfg.eval.shot, episodes=args.episodes,
                          data=data, progress=False, device="cpu")
        images = args.steps * cfg.train.way * (cfg.train.shot + cfg.train.query)
        rows.append({"precision": select_precision("cpu", prefer=precision).dtype, "steps": args.steps,
                     "train_s": seconds, "train_images_per_s": images / seconds, "mean": ev.mean,
                     "ci95": ev.ci95, "episodes": ev.episodes, "task": f"{ev.way}-way {ev.shot}-shot"})
    print("| precision | steps | train s | train images/s | test accuracy (95% CI) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['steps']} | {r['train_s']:.0f} | {r['train_images_per_s']:.0f} | "
              f"{100 * r['mean']:.2f} +- {100 * r['ci95']:.2f} ({r['task']}, {r['episodes']} episodes) |")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
