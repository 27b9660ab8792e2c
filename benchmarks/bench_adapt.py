"""A workspace that learns from use (issue 18 item 3): does choosing the head by held-out answers on
the workspace's own examples (`fewshot.decision.heldout.choose_head`, what POST /workspaces/{ws}/adapt
runs) serve more right answers than the plain prototypes?

Photo episodes on the photos bundle's cached embeddings (`bench_openset_photos.py --sections embed`:
the Lite2 photos bundle's ONNX embedder as served): miniImageNet *test* classes and the CIFAR-10 subset
(test photos). Each episode is a workspace: `way` classes taught with `shot` photos each, answering 15
new photos per class. Its decision is the photos bundle's (cosine, the "shape" open-set rule fitted
here on miniImageNet *validation* photos, as `build_photos_bundle` fits it); the heads compared:

    prototype   the nearest prototype (the bundle's head)
    logistic    the L2-normalised logistic probe refitted on the taught photos
    adapted     what `choose_head` picks on the taught photos alone (5-fold cross-validation; the
                probe only when it answers strictly more held-out photos right; too few: prototype)

"right" = answered with the photo's class and accepted (not "unknown"): what the user is told.
Means over fixed-seed episodes with 95% CI, and the paired difference adapted - prototype.
Also the wall time of `choose_head` per workspace size (one thread).

    FEWSHOT_DATA=../shared/datasets python benchmarks/bench_adapt.py --episodes 300

ImageNet-1k trained the backbone's weights and covers miniImageNet's test classes: these are not
few-shot results in the benchmark's sense; they are what a workspace of such photos sees.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_openset_photos import CACHE, load_set  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CELLS = [(s, w, k) for s in ("mini-test", "cifar-test") for w in (5, 10) for k in (5, 10, 20)
         if not (s == "cifar-test" and w == 10)]  # CIFAR-10 has 10 classes: 10-way is every class


def bundle_decision(cache: Path, seed: int, probe_c: float = 1.0) -> Any:
    """The photos bundle's decision: its head and rules as `build_photos_bundle` fits them; the
    probe's C `probe_c` (the photos bundle's is 1)."""
    from fewshot.artifacts.photos import photos_open_set
    from fewshot.decision import BundleDecision, DecisionRule

    cal = photos_open_set(load_set(cache, "mini-val"), np.random.default_rng(seed),
                          fitted_on="miniImageNet validation classes (cached photos)")
    return BundleDecision(DecisionRule("prototype", "cosine", probe_c=probe_c), cal.rules)


def run_cell(decision: Any, pool: list[np.ndarray], way: int, shot: int, episodes: int, seed: int) -> dict[str, Any]:
    from fewshot.decision import decide, fit_memory
    from fewshot.decision.heldout import choose_head
    from fewshot.training.evaluate import mean_ci95

    cands = [decision.served(head="prototype"), decision.served(head="probe")]
    right = {h: np.zeros(episodes) for h in ("prototype", "logistic", "adapted")}
    forced = {h: np.zeros(episodes) for h in ("prototype", "logistic")}
    chose = np.zeros(episodes, bool)
    seconds = np.zeros(episodes)
    for e in range(episodes):
        rng = np.random.default_rng([seed, way, shot, e])
        classes = rng.choice(len(pool), way, replace=False)
        picks = [rng.choice(len(pool[c]), shot + 15, replace=False) for c in classes]
        xs = np.concatenate([pool[c][p[:shot]] for c, p in zip(classes, picks)])
        xq = np.concatenate([pool[c][p[shot:]] for c, p in zip(classes, picks)])
        ys, yq = np.repeat(np.arange(way), shot), np.repeat(np.arange(way), 15)
        t0 = time.perf_counter()
        choice = choose_head(cands, xs, ys, way)
        seconds[e] = time.perf_counter() - t0
        chose[e] = choice.chosen == "probe"
        for name, d in zip(("prototype", "logistic"), cands):
            a = decide(d, fit_memory(d, xs, ys, way), xq)
            right[name][e] = np.mean((a.label == yq) & a.known)
            forced[name][e] = np.mean(a.label == yq)
        right["adapted"][e] = right["logistic" if chose[e] else "prototype"][e]
    out: dict[str, Any] = {h: dict(zip(("mean", "ci95"), mean_ci95(v))) for h, v in right.items()}
    out["forced"] = {h: dict(zip(("mean", "ci95"), mean_ci95(v))) for h, v in forced.items()}
    out["adapted_minus_prototype"] = dict(zip(("mean", "ci95"), mean_ci95(right["adapted"] - right["prototype"])))
    out["chose_logistic"] = float(chose.mean())
    out["choose_seconds_median"] = float(np.median(seconds))
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| photos | way | shot | prototype | logistic | adapted | adapted - prototype | chose logistic | "
             "forced: prototype / logistic | choose_head (median) |", "|" + "---|" * 10]
    for key, r in res["cells"].items():
        s, w, k = key.split("/")

        def f(x: dict[str, float]) -> str:
            return f"{100 * x['mean']:.2f} ± {100 * x['ci95']:.2f}"

        lines.append(f"| {s} | {w} | {k} | {f(r['prototype'])} | {f(r['logistic'])} | {f(r['adapted'])} | "
                     f"{100 * r['adapted_minus_prototype']['mean']:+.2f} ± {100 * r['adapted_minus_prototype']['ci95']:.2f} | "
                     f"{100 * r['chose_logistic']:.0f}% | {100 * r['forced']['prototype']['mean']:.2f} / "
                     f"{100 * r['forced']['logistic']['mean']:.2f} | {1000 * r['choose_seconds_median']:.0f} ms |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "adapt.json")
    p.add_argument("--probe-c", type=float, default=1.0,
                   help="C of the logistic probe (objective mean CE + ||W||^2 / (2 C n)); the photos bundle's is 1")
    p.add_argument("--cells", default="", help="only these cells, e.g. 'cifar-test/5/10,mini-test/10/10' (default: all)")
    args = p.parse_args()
    cells = [c for c in CELLS if not args.cells or "/".join(map(str, c)) in args.cells.split(",")]
    if not cells:
        p.error(f"--cells {args.cells!r} names none of {['/'.join(map(str, c)) for c in CELLS]}")
    import torch

    torch.set_num_threads(1)  # a script, not the library: one thread, as the service runs its heads
    decision = bundle_decision(args.cache, args.seed, args.probe_c)
    sets = {s: load_set(args.cache, s) for s in ("mini-test", "cifar-test")}
    res: dict[str, Any] = {
        "command": "python benchmarks/bench_adapt.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "episodes": args.episodes, "seed": args.seed,
        "probe_c": args.probe_c,
        "embed_report": json.loads((args.cache / "embed_report.json").read_text()), "cells": {}}
    for s, w, k in cells:
        t0 = time.perf_counter()
        res["cells"][f"{s}/{w}/{k}"] = run_cell(decision, sets[s], w, k, args.episodes, args.seed)
        print(f"{s} {w}-way {k}-shot: {time.perf_counter() - t0:.0f} s", flush=True)
    args.out.write_text(json.dumps(res, indent=2))
    md = table(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
