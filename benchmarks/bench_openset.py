"""Open-set ("unknown") rejection as served: how many correct answers a rule keeps and how many
queries of never-taught classes it rejects, on held-out classes.

The bundle's ONNX embedder embeds every validation and test class. Rules are CHOSEN on validation
episodes only (5-way 5-shot, plus 1-shot for the shot penalty; `fewshot.artifacts.calibration.
fit_open_set_rules`, the function export uses), against the targets: keep >= 95% of the answers
forced choice gets right (TA) while rejecting >= 80% of untaught-class queries (rej). They are then
measured on fresh fixed-seed episodes of validation and TEST classes: N-way K-shot with 15 queries
per taught class plus 15 queries of one untaught class, for 5w1s, 5w5s, 20w1s, 20w5s, 5w1-5s
(each class taught with 1..5 examples, as in a real workspace) and 3w5s (the reported user's case).

Candidates (novelty, higher = less like the nearest class; see `fewshot.decision.openset`):
  legacy        d^2 (or 1 - cos) with the bundle's legacy threshold (5% of unknowns accepted): the
                behaviour before this change
  global        the same score, threshold re-chosen for the targets
  count         d^2 / (s0 (1 + gamma / n_k)): shot-aware, no per-class spread
  spread        d^2 / (s_k~ (1 + gamma / n_k)), s_k~ shrunk toward s0 (the rule export now stores)
  bundle        the "spread" rule stored in the bundle by export, when it has one
  ratio         d^2_nearest / d^2_second (needs the second-nearest score; reference only)

    python benchmarks/bench_openset.py --bundle runs/quickstart/bundle --episodes 600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGET_TA, TARGET_REJ = 0.95, 0.80
CONFIGS: dict[str, tuple[int, int | tuple[int, int]]] = {
    "5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5), "5w1-5s": (5, (1, 5)), "3w5s": (3, 5)}
METRICS = ("euclidean", "cosine")
COLOURS = {"legacy": "tab:gray", "global": "tab:blue", "count": "tab:orange", "spread": "tab:red",
           "ratio": "tab:green", "bundle": "tab:purple"}
LINE_WIDTH = {"global": 3.0, "count": 2.0}  # wider underneath: the rules' curves coincide at a single shot


@dataclass(frozen=True)
class Candidate:
    """A named novelty function on `OpenSetScores` with its default threshold."""

    name: str
    novelty: Callable[[Any], np.ndarray]
    threshold: float
    rule: dict[str, Any] | None  # OpenSetRule.to_dict(), None for reference-only rules


def embed_splits(bundle: Any, config_path: Path) -> dict[str, list[np.ndarray]]:
    """split -> [(20, D) float32 embeddings per class] through the bundle's ONNX embedder."""
    from fewshot.config import load_config
    from fewshot.training.data import images_by_class, load_run_data

    data = load_run_data(load_config(config_path).data, progress=False)
    return {split: [bundle.onnx_embedder.embed(x) for _, x in sorted(images_by_class(data, split).items())]
            for split in ("val", "test")}


def of_rule(name: str, rule: Any) -> Candidate:
    return Candidate(name, lambda s: s.novelty(rule), rule.threshold, rule.to_dict())


def ratio_novelty(metric: str) -> Callable[[Any], np.ndarray]:
    if metric == "euclidean":
        return lambda s: s.score / np.maximum(s.second, 1e-12)
    return lambda s: (1.0 - s.score) / np.maximum(1.0 - s.second, 1e-12)


def choose(val: list[np.ndarray], bundle: Any, args: argparse.Namespace) -> tuple[dict[str, list[Candidate]], dict[str, Any]]:
    """Per metric the candidates, all chosen on validation episodes (same episodes for each)."""
    from fewshot.artifacts.calibration import balanced_threshold, fit_open_set_rules
    from fewshot.decision import OpenSetRule

    fit = dict(n_way=5, n_shot=5, n_query=15, n_episodes=args.fit_episodes, target_true_accept=TARGET_TA,
               target_rejection=TARGET_REJ)
    spread, report, main = fit_open_set_rules(val, np.random.default_rng(args.seed), **fit)  # type: ignore[arg-type]
    count, _, _ = fit_open_set_rules(val, np.random.default_rng(args.seed), prior_strengths=(1e6,), **fit)  # type: ignore[arg-type]
    out: dict[str, list[Candidate]] = {}
    for m in METRICS:
        cal = bundle.calibration
        t = ((bundle.manifest.calibration or {}).get("thresholds") or {}).get(m)  # a bundle's legacy raw-score threshold
        legacy = None if t is None else OpenSetRule.from_legacy_threshold(m, t)
        stored = cal.rule(m) if cal else None
        flat = OpenSetRule("global", m, report["measured"][m]["global"]["threshold"])
        s = main[m]
        rn = ratio_novelty(m)(s)
        rules = [("legacy", legacy), ("global", flat), ("count", count[m]), ("spread", spread[m]), ("bundle", stored)]
        out[m] = [of_rule(n, r) for n, r in rules if r is not None]
        out[m].append(Candidate("ratio", ratio_novelty(m), balanced_threshold(rn[s.correct], rn[~s.known], TARGET_TA,
                                                                               TARGET_REJ), None))
    return out, report


def measure(c: Candidate, s: Any) -> dict[str, Any]:
    """Operating point at the default, AUROC, what is reachable, and the curve (TA at rej = 0..1)."""
    from fewshot.artifacts.calibration import auroc, trade_off

    nov = c.novelty(s)
    kept, unknown = nov[s.correct], nov[~s.known]
    _, ta, rej = trade_off(kept, unknown)
    grid = np.linspace(0, 1, 101)
    curve = [round(float(ta[rej >= r].max()), 4) if np.any(rej >= r) else 0.0 for r in grid]
    return {"true_accept": float(np.mean(kept <= c.threshold)), "unknown_rejection": float(np.mean(unknown > c.threshold)),
            "auroc": auroc(kept, unknown), "ta_at_80_rejection": float(ta[rej >= TARGET_REJ].max()),
            "rejection_at_95_ta": float(rej[ta >= TARGET_TA].max()), "accuracy": float(s.correct[s.known].mean()),
            "n_correct": int(s.correct.sum()), "n_unknown": int((~s.known).sum()),
            "curve_rejection": grid.round(2).tolist(), "curve_true_accept": curve}


def evaluate(emb: dict[str, list[np.ndarray]], cands: dict[str, list[Candidate]], args: argparse.Namespace) -> dict[str, Any]:
    from fewshot.artifacts.calibration import sample_open_set

    res: dict[str, Any] = {m: {} for m in METRICS}
    for si, split in enumerate(("val", "test")):
        for ci, (name, (way, shot)) in enumerate(CONFIGS.items()):
            rng = np.random.default_rng([args.seed + 1, si, ci])  # fresh episodes, not the ones rules were chosen on
            scores = sample_open_set(emb[split], rng, n_way=way, n_shot=shot, n_query=15, n_episodes=args.episodes)
            for m in METRICS:
                res[m].setdefault(split, {})[name] = {c.name: measure(c, scores[m]) for c in cands[m]}
    return res


def print_tables(res: dict[str, Any], cands: dict[str, list[Candidate]], deployed: str) -> None:
    for m in sorted(METRICS, key=lambda x: x != deployed):
        print(f"\n### {m}{' (deployed)' if m == deployed else ''}: kept-correct % / unknown-rejected % at the "
              "default (AUROC)\n")
        print("| rule | split | " + " | ".join(CONFIGS) + " |")
        print("|---|---|" + "---:|" * len(CONFIGS))
        for c in cands[m]:
            for split in ("val", "test"):
                cells = [res[m][split][k][c.name] for k in CONFIGS]
                print(f"| {c.name} | {split} | " + " | ".join(
                    f"{100 * x['true_accept']:.1f} / {100 * x['unknown_rejection']:.1f} ({x['auroc']:.3f})" for x in cells)
                    + " |")
        print(f"\n{m}, reachable by moving the threshold: kept-correct % at 80% rejected / rejected % at 95% kept\n")
        print("| rule | split | " + " | ".join(CONFIGS) + " |")
        print("|---|---|" + "---:|" * len(CONFIGS))
        for c in cands[m]:
            if c.name == "legacy":
                continue  # same curve as "global"
            for split in ("val", "test"):
                cells = [res[m][split][k][c.name] for k in CONFIGS]
                print(f"| {c.name} | {split} | " + " | ".join(
                    f"{100 * x['ta_at_80_rejection']:.1f} / {100 * x['rejection_at_95_ta']:.1f}" for x in cells) + " |")


def plot(res: dict[str, Any], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(CONFIGS), figsize=(4 * len(CONFIGS), 8), sharex=True, sharey=True)
    for row, split in enumerate(("val", "test")):
        for col, cfg in enumerate(CONFIGS):
            ax = axes[row, col]
            ax.fill_between([TARGET_REJ, 1.0], TARGET_TA, 1.0, color="tab:green", alpha=0.12, lw=0)
            for name, r in res[metric][split][cfg].items():
                colour = COLOURS.get(name, "black")
                if name != "legacy":
                    ax.plot(r["curve_rejection"], r["curve_true_accept"], color=colour, lw=LINE_WIDTH.get(name, 1.2),
                            label=f"{name} (AUROC {r['auroc']:.3f})")
                ax.plot(r["unknown_rejection"], r["true_accept"], "o" if name != "legacy" else "x",
                        color=colour, ms=7, mew=2)
            ax.set_title(f"{split} {cfg}")
            ax.set_xlim(0.3, 1.0)
            ax.set_ylim(0.4, 1.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
            if row == 1:
                ax.set_xlabel("unknown queries rejected")
            if col == 0:
                ax.set_ylabel("correct answers kept")
    fig.suptitle(f"Open-set rejection ({metric}); dots: default thresholds chosen on val 5w5s "
                 f"(x: the legacy 5%-false-accept threshold); green: target {TARGET_TA:.0%} kept / {TARGET_REJ:.0%} rejected")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def meta(args: argparse.Namespace, bundle: Any) -> dict[str, Any]:
    import onnxruntime
    import torch

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "bundle": str(args.bundle), "bundle_id": bundle.bundle_id, "command": " ".join(["python", *sys.argv]),
            "seed": args.seed, "episodes": args.episodes, "fit_episodes": args.fit_episodes,
            "targets": {"true_accept": TARGET_TA, "unknown_rejection": TARGET_REJ}}


def main() -> None:
    from fewshot.artifacts.bundle import load_bundle

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "runs/quickstart/bundle")
    p.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: the bundle's source run)")
    p.add_argument("--episodes", type=int, default=600, help="evaluation episodes per split and shape")
    p.add_argument("--fit-episodes", type=int, default=600, help="validation episodes per shot to choose rules on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/openset.json")
    p.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/openset.png")
    args = p.parse_args()
    t0 = time.perf_counter()
    bundle = load_bundle(args.bundle)
    config = args.config or ROOT / bundle.manifest.source["run"] / "config.yaml"
    emb = embed_splits(bundle, config)
    cands, report = choose(emb["val"], bundle, args)
    res = evaluate(emb, cands, args)
    deployed = bundle.decision_rule.metric
    print(f"bundle {bundle.bundle_id} ({args.bundle}); {len(emb['val'])} val / {len(emb['test'])} test classes; "
          f"{args.episodes} episodes per split and shape; rules chosen on {args.fit_episodes} val episodes per shot")
    print_tables(res, cands, deployed)
    out = {"meta": meta(args, bundle), "deployed_metric": deployed, "fit_report": report,
           "rules": {m: {c.name: {"rule": c.rule, "threshold": c.threshold} for c in cands[m]} for m in METRICS},
           "results": res, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    plot(res, deployed, args.plot)
    print(f"\nraw: {args.out}\nplot: {args.plot}\n({out['seconds']} s)")


if __name__ == "__main__":
    main()
