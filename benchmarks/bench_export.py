"""What is evaluated is what is served: every learner family trained briefly on real Omniglot,
evaluated by the protocol (its own `predict`), exported, and measured as served (the written ONNX
model in ONNX Runtime + the service's decision rule) on the same fixed-seed test episodes.

Each run trains from its config in `configs/` under a wall-clock budget (not to convergence: the
point is the gap between the learner and its bundle, not the accuracy itself). The export is
forced so that a miss is recorded rather than refused; the table marks it.

    python benchmarks/bench_export.py --budget 150 --episodes 600 --out benchmarks/results/export_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["protonet", "maml", "fomaml", "anil", "metasgd", "reptile", "pretrain"]


def run_family(name: str, args: argparse.Namespace) -> dict[str, object]:
    from fewshot.artifacts.bundle import load_bundle
    from fewshot.artifacts.export import export_run
    from fewshot.config import load_config
    from fewshot.training.loop import train
    from fewshot.training.protocol import evaluate_run

    cfg = load_config(ROOT / "configs" / f"{name}_omniglot.yaml",
                      [f"output_dir={args.output_dir}", f"train.max_seconds={args.budget}", "train.val_every=100000",
                       "eval.way=5", "eval.shot=1"])
    t0 = time.perf_counter()
    result = train(cfg, progress=False, resume=False)
    learner = evaluate_run(cfg.run_dir(), way=5, shot=1, episodes=args.episodes, progress=False)
    bundle_dir = cfg.run_dir() / "bundle"
    shutil.rmtree(bundle_dir, ignore_errors=True)
    export_run(cfg.run_dir(), bundle_dir, force=True)
    m = load_bundle(bundle_dir).manifest
    served = m.metrics["test_5w1s_any"]
    row = {"learner": name, "train_steps": result.steps, "learner_mean": learner.mean, "learner_ci95": learner.ci95,
           "served_mean": served["served_mean"], "served_ci95": served["served_ci95"], "drop": served["drop"],
           "embedder": (m.deployment or {}).get("embedder"), "rule": (m.deployment or {}).get("rule"),
           "rule_val_accuracy": (m.deployment or {}).get("rule_val_accuracy"),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"| {name} | {result.steps} | {100 * learner.mean:.2f} +- {100 * learner.ci95:.2f} | "
          f"{100 * row['served_mean']:.2f} +- {100 * row['served_ci95']:.2f} | {-100 * row['drop']:+.2f} | "  # type: ignore[operator]
          f"{row['embedder']}, {row['rule']['rule']}/{row['rule']['metric']} | "  # type: ignore[index]
          f"{'yes' if row['drop'] <= 0.01 else 'NO'} |", flush=True)  # type: ignore[operator]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per family")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--families", nargs="*", default=FAMILIES)
    p.add_argument("--output-dir", default="runs/bench-export")
    p.add_argument("--out", default="benchmarks/results/export_cpu.json")
    args = p.parse_args()
    print(f"\n### Learner vs bundle as served, Omniglot (Vinyals) test, 5-way 1-shot, {args.episodes} episodes\n")
    print("| learner | train steps | learner (own predict) | bundle as served (ONNX + rule) | served - learner | "
          "deployment | at most 1 point below |")
    print("|---|---:|---:|---:|---:|---|---|")
    rows = [run_family(name, args) for name in args.families]
    out = {"date": str(date.today()), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "budget_s": args.budget, "episodes": args.episodes,
           "command": " ".join(["python", *sys.argv]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nraw: {args.out}")


if __name__ == "__main__":
    main()
