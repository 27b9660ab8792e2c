"""Learning curves and comparison plots (PNG, headless).

Figures are made with `matplotlib.figure.Figure` directly, never through pyplot: importing this
module leaves the process's matplotlib backend (and pyplot's global figure list) alone.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure


def _read(csv_path: Path) -> dict[str, list[float]]:
    cols: dict[str, list[float]] = {}
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                cols.setdefault(k, []).append(float(v) if v not in ("", None) else float("nan"))
    return cols


def plot_curves(csv_path: Path, out: Path, title: str = "") -> Path:
    """Training loss/accuracy and validation accuracy against step."""
    cols = _read(csv_path)
    fig = Figure(figsize=(10, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    step = cols.get("step", [])
    # every named term the run logged (task loss, distillation terms); the objective "loss" when it is
    # the only one (Reptile's "loss" is a surrogate whose value means nothing: its "task" is shown)
    skip = {"step", "lr", "elapsed_s", "val_acc", "val_ci95", "acc"}
    terms = [k for k in cols if k not in skip and k != "loss"] or ["loss"]
    positive = True
    for k in terms:
        ax1.plot(step, cols[k], lw=0.8, label=f"train {k}")
        positive = positive and all(v > 0 for v in cols[k] if v == v)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss terms")
    if positive:
        ax1.set_yscale("log")
    ax1.legend()
    ax2.plot(step, [100 * a for a in cols.get("acc", [])], lw=0.8, alpha=0.6, label="train query acc")
    val = [(s, 100 * v, 100 * c) for s, v, c in zip(step, cols.get("val_acc", []), cols.get("val_ci95", [])) if v == v]
    if val:
        s, v, c = zip(*val)
        ax2.errorbar(s, v, yerr=c, marker="o", ms=3, capsize=2, label="validation acc (95% CI)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    return out


def plot_comparison(rows: list[tuple[str, str, float, float]], out: Path, title: str) -> Path:
    """Grouped bars: one group per task (e.g. "5-way 1-shot"), one bar per run; error bars = 95% CI.

    rows: (run label, task label, mean accuracy %, ci95 %).
    """
    runs = list(dict.fromkeys(r[0] for r in rows))
    tasks = list(dict.fromkeys(r[1] for r in rows))
    lookup = {(r[0], r[1]): (r[2], r[3]) for r in rows}
    width = 0.8 / max(1, len(runs))
    fig = Figure(figsize=(max(6.0, 1.1 * len(tasks) * max(1, len(runs)) * 0.35 + 3), 4.2))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10"]
    for i, run in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, t in enumerate(tasks) if (run, t) in lookup]
        vals = [lookup[(run, t)] for t in tasks if (run, t) in lookup]
        ax.bar(xs, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=2, label=run, color=cmap(i % 10))
    ax.set_xticks(range(len(tasks)), tasks)
    lo = min((r[2] - r[3] for r in rows), default=0.0)
    ax.set_ylim(max(0.0, lo - 3), 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
