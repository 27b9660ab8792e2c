"""Learning curves and comparison plots (PNG, headless)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    step = cols.get("step", [])
    ax1.plot(step, cols.get("loss", []), lw=0.8, label="train loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
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
    plt.close(fig)
    tmp.replace(out)
    return out


def plot_comparison(rows: list[tuple[str, float, float]], out: Path, title: str) -> Path:
    """Bar plot of (label, mean accuracy %, ci95 %) rows."""
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.8))
    labels = [r[0] for r in rows]
    ax.bar(range(len(rows)), [r[1] for r in rows], yerr=[r[2] for r in rows], capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    lo = min(r[1] - r[2] for r in rows) if rows else 0
    ax.set_ylim(max(0.0, lo - 5), 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    for i, r in enumerate(rows):
        ax.text(i, r[1] + r[2] + 0.3, f"{r[1]:.1f}", ha="center", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
