"""Accuracy per CPU-hour of the zoo's training runs: validation accuracy against CPU core-hours.

Reads every run under `zoo/runs/` (metrics.csv: validation rows; segments.json: the threads each
stretch of work had), converts each row's training seconds to core-hours through the segment it
fell in, and plots the runs in one panel per validation protocol (dataset, way, shot: accuracies on
different protocols are not comparable). Prints a table of the validation points and writes the
raw numbers.

    python benchmarks/plot_zoo_training.py [--runs zoo/runs] [--out benchmarks/results/zoo_training]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def core_hours_at(elapsed_s: float, segments: list[dict[str, Any]]) -> float:
    """Core-hours spent when the run's training clock read `elapsed_s` (segments in order; each
    segment's seconds count with its threads x processes)."""
    hours, before = 0.0, 0.0
    for s in segments:
        span = float(s["train_seconds"])
        cores = int(s.get("threads", 1)) * int(s.get("world_size", 1))
        used = min(max(elapsed_s - before, 0.0), span)
        hours += used * cores / 3600
        before += span
    if elapsed_s > before:  # past the last recorded checkpoint: the last segment's cores
        last = segments[-1] if segments else {}
        hours += (elapsed_s - before) * int(last.get("threads", 1)) * int(last.get("world_size", 1)) / 3600
    return hours


def read_run(run: Path) -> dict[str, Any]:
    segs_path = run / "segments.json"
    segments = json.loads(segs_path.read_text())["segments"] if segs_path.is_file() else []
    points = []
    with open(run / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("val_acc"):
                e = float(row["elapsed_s"])
                points.append({"step": int(row["step"]), "elapsed_s": e, "core_hours": core_hours_at(e, segments),
                               "val_acc": float(row["val_acc"]), "val_ci95": float(row["val_ci95"] or "nan"),
                               "lr": float(row["lr"])})
    return {"run": run.name, "protocol": protocol(run), "segments": len(segments), "points": points}


def protocol(run: Path) -> str:
    """The run's validation protocol from its config.yaml, e.g. "omniglot, 20-way 1-shot"."""
    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    train = cfg.get("train") or {}
    dataset = (cfg.get("data") or {}).get("dataset", "?")
    return f"{dataset}, {train.get('val_way', '?')}-way {train.get('val_shot', '?')}-shot"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="zoo/runs")
    ap.add_argument("--out", default="benchmarks/results/zoo_training")
    args = ap.parse_args()
    runs = [read_run(p) for p in sorted(Path(args.runs).iterdir()) if (p / "metrics.csv").is_file()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    protocols = sorted({r["protocol"] for r in runs})
    fig, axes = plt.subplots(1, len(protocols), figsize=(7 * len(protocols), 4.2), squeeze=False)
    print("| run | validation protocol | step | core-hours | validation accuracy |\n|---|---|---:|---:|---:|")
    for ax, proto in zip(axes[0], protocols):
        for r in (r for r in runs if r["protocol"] == proto):
            pts = r["points"]
            for p in pts:
                print(f"| {r['run']} | {proto} | {p['step']:,} | {p['core_hours']:.2f} | "
                      f"{100 * p['val_acc']:.2f} +- {100 * p['val_ci95']:.2f} |")
            ax.plot([p["core_hours"] for p in pts], [100 * p["val_acc"] for p in pts], marker="o", ms=3,
                    label=r["run"])
        ax.set_xlabel("CPU core-hours of training (2-core machine: 2 core-hours per hour)")
        ax.set_ylabel("validation accuracy, %")
        ax.set_title(f"accuracy per CPU-hour: {proto} (validation classes)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    print(f"\nplot: {out.with_suffix('.png')}; raw: {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
