"""Which training recipe buys the most Lake-protocol accuracy per CPU-hour (issue 15, Lake target).

Lake's protocol tests 20-way 1-shot episodes drawn *within* one of the 20 evaluation alphabets. To
choose a recipe without looking at those alphabets, every variant here trains on 25 of the 30
background alphabets (rotations as extra classes) and validates on 20-way 1-shot within-alphabet
episodes of the 5 whole background alphabets held out (`data.lake_val_alphabets=5`, seeded): the
same kind of episode as the test, on alphabets none of the variants saw. Each variant gets the same
wall-clock budget on the same threads, one after another (never two at once), with a constant
learning rate so that no schedule is cut short by the budget (validation, about 9 s a point, counts
in it). Every variant starts from scratch (`--no-resume`). The winner is then trained on the 30
alphabets (`configs/zoo/omniglot_protonet_conv4_lake.yaml`) and scored once on the evaluation
alphabets.

    python benchmarks/lake_recipes.py [--seconds 300] [--variants base,shot1,...] \
        [--out benchmarks/results/lake_recipes]

Prints a table (best and last validation accuracy per variant, steps) and writes
`results.json` (every validation point) and `curves.png` (validation accuracy against CPU
core-hours, one line per variant).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "protonet_lake.yaml"

# the held-out-alphabet validation every variant shares
COMMON = ["data.lake_val_fraction=0", "data.lake_val_alphabets=5", "train.val_domain_mode=within",
          "train.val_way=20", "train.val_shot=1", "train.val_episodes=300", "train.val_every=500",
          "train.schedule=constant", "train.steps=100000", "train.checkpoint_every=100000"]

# name -> (what it changes, overrides on top of configs/protonet_lake.yaml + COMMON)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the shipped recipe: 60-way 5-shot, classes from any alphabet", []),
    "shot1": ("60-way 1-shot (Snell et al.'s one-shot shape)", ["train.shot=1"]),
    "within": ("60-way 1-shot, all classes of an episode from one alphabet", ["train.shot=1", "train.domain_mode=within"]),
    "within20": ("20-way 1-shot within one alphabet (the test's shape)",
                 ["train.shot=1", "train.way=20", "train.query=15", "train.domain_mode=within"]),
    "affine": ("60-way 1-shot + Koch et al.'s affine distortions", ["train.shot=1", "train.affine=true"]),
    "within_affine": ("60-way 1-shot within one alphabet + affine distortions",
                      ["train.shot=1", "train.domain_mode=within", "train.affine=true"]),
    "px56": ("60-way 1-shot at 56x56 px instead of 28x28 (a 3x3 final feature map)",
             ["train.shot=1", "data.image_size=56"]),
    "wide": ("within_affine on a double-width Conv-4 (128 channels, about 4x the compute per image)",
             ["train.shot=1", "train.domain_mode=within", "train.affine=true", "model.backbone_args.width=2.0"]),
    "pretrain": ("classification pre-training over every training character and rotation, batches of 128, "
                 "SGD 0.05 + affine distortions (Lake et al. 2015's ConvNet baseline, RFS's recipe), then the "
                 "learner's served rule",
                 ["model.learner=pretrain", "train.batch_size=128", "train.optimizer=sgd", "train.lr=0.05",
                  "train.momentum=0.9", "train.weight_decay=0.0005", "train.affine=true"]),
}


def run_variant(name: str, overrides: list[str], seconds: float, out: Path, threads: int) -> dict[str, Any]:
    run_dir = out / "runs"
    cmd = [sys.executable, "-m", "fewshot", "train", "--no-resume", str(CONFIG), *COMMON, *overrides,
           f"name=lake-recipe-{name}", f"output_dir={run_dir}", f"train.max_seconds={seconds}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = list(csv.DictReader((run_dir / f"lake-recipe-{name}" / "metrics.csv").open()))
    val = [(int(r["step"]), float(r["elapsed_s"]), float(r["val_acc"]), float(r["val_ci95"]))
           for r in rows if r["val_acc"]]
    steps = int(rows[-1]["step"]) if rows else 0
    return {"variant": name, "what": VARIANTS[name][0], "overrides": overrides, "threads": threads,
            "budget_s": seconds, "wall_s": wall, "steps": steps,
            "val": [{"step": s, "elapsed_s": e, "acc": a, "ci95": c} for s, e, a, c in val]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lake_recipes")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "results.json"
    results: dict[str, Any] = json.loads(raw.read_text()) if raw.is_file() else {}
    import torch  # only for the version recorded

    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {VARIANTS[name][0]} ({args.seconds:.0f} s)", flush=True)
        results[name] = run_variant(name, VARIANTS[name][1], args.seconds, args.out, args.threads)
        results[name]["torch"] = torch.__version__
        results[name]["date"] = time.strftime("%Y-%m-%d")
        raw.write_text(json.dumps(results, indent=1))  # after each variant: a stop loses none done

    print("\n| variant | what | steps | best val (20w1s within, held-out alphabets) | last val |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        if not r["val"]:
            continue
        best = max(r["val"], key=lambda v: v["acc"])
        last = r["val"][-1]
        print(f"| {name} | {r['what']} | {r['steps']} | {100 * best['acc']:.2f} +- {100 * best['ci95']:.2f} "
              f"(step {best['step']}) | {100 * last['acc']:.2f} +- {100 * last['ci95']:.2f} |")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        xs = [v["elapsed_s"] * r["threads"] / 3600 for v in r["val"]]
        ax.plot(xs, [100 * v["acc"] for v in r["val"]], marker="o", ms=3, label=name)
    ax.set_xlabel("CPU core-hours")
    ax.set_ylabel("val accuracy (%), 20-way 1-shot within alphabet")
    ax.set_title("Lake recipes: 5 held-out background alphabets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "curves.png", dpi=120)
    print(f"raw: {raw}; plot: {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
