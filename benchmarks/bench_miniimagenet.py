"""The miniImageNet protocol table: trained runs on the 20 test classes of the Ravi & Larochelle split,
5-way 1-shot and 5-way 5-shot, 15 queries per class, 600 fixed-seed episodes (seed 1234), mean and
95% CI; with each model's parameters and CPU latency per image (ONNX Runtime, batch 1, one thread)
for the accuracy-latency plot, next to the published numbers it is measured against.

    FEWSHOT_DATA=../shared/datasets .venv/bin/python benchmarks/bench_miniimagenet.py \
        runs/miniimagenet-pretrain-conv4 runs/miniimagenet-bornagain-conv4 runs/miniimagenet-protonet-conv4

Each evaluation is also written into its run folder (`eval-test-5w{1,5}s-any.json`). Raw numbers:
benchmarks/results/miniimagenet_protocol.json; plot: benchmarks/results/miniimagenet_protocol.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from fewshot.config import load_config
from fewshot.distill.report import measure_model
from fewshot.training.data import load_run_data
from fewshot.training.protocol import evaluate_run
from fewshot.training.runs import load_trained

RESULTS = Path(__file__).resolve().parent / "results"
# Published 5-way accuracies (%) on the same split and protocol, for the table's reference column.
PUBLISHED = {
    "ProtoNet Conv-4 (Snell et al. 2017)": (49.42, 68.20),
    "RFS-simple ResNet-12 (Tian et al. 2020)": (62.02, 79.64),
    "RFS-distill ResNet-12 (Tian et al. 2020)": (64.82, 82.14),
}


def earlier_evaluation(run: Path, shot: int, episodes: int) -> dict[str, Any] | None:
    """The run's stored evaluation of these episodes, if written after its best checkpoint."""
    path = run / f"eval-test-5w{shot}s-any.json"
    best = run / "checkpoints" / "best" / "manifest.json"
    if not path.is_file() or path.stat().st_mtime < best.stat().st_mtime:
        return None
    r = json.loads(path.read_text())
    same = (r["episodes"], r["seed"], r["query"], r["way"]) == (episodes, 1234, 15, 5)
    return {"mean": 100 * r["mean"], "ci95": 100 * r["ci95"], "episodes": r["episodes"]} if same else None


def evaluate(run: Path, data: Any, episodes: int, reuse: bool) -> dict[str, Any]:
    accs = {}
    for shot in (1, 5):
        stored = earlier_evaluation(run, shot, episodes) if reuse else None
        if stored is None:
            r = evaluate_run(run, way=5, shot=shot, query=15, episodes=episodes, seed=1234, split="test",
                             data=data, progress=False)
            stored = {"mean": 100 * r.mean, "ci95": 100 * r.ci95, "episodes": r.episodes}
        accs[f"5w{shot}s"] = stored
    learner, manifest = load_trained(run, device="cpu")
    size = measure_model(learner.backbone, data.cache.image_shape[0], data.cache.image_shape[1], runs=100)
    config = load_config(run / "config.yaml")
    return {"run": str(run), "learner": config.model.learner, "backbone": config.model.backbone,
            "step": manifest.get("step"), "accuracy": accs, **size}


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, task in zip(axes, ("5w1s", "5w5s")):
        for r in rows:
            a = r["accuracy"][task]
            ax.errorbar(r["latency_ms"], a["mean"], yerr=a["ci95"], fmt="o", capsize=3, label=Path(r["run"]).name)
        ref = PUBLISHED["ProtoNet Conv-4 (Snell et al. 2017)"][0 if task == "5w1s" else 1]
        ax.axhline(ref, ls="--", c="grey", lw=1, label="ProtoNet Conv-4 published")
        ax.set(title=f"miniImageNet test, {task}, 600 episodes", xlabel="CPU latency per image (ms, ORT, 1 thread)",
               ylabel="accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--reuse", action="store_true",
                   help="use a run's stored evaluation of the same episodes when newer than its best checkpoint")
    p.add_argument("--out", type=Path, default=RESULTS / "miniimagenet_protocol.json")
    args = p.parse_args()
    data = load_run_data(load_config(args.runs[0] / "config.yaml").data, progress=False)
    rows = [evaluate(run, data, args.episodes, args.reuse) for run in args.runs]
    print("| run | learner | step | 5-way 1-shot | 5-way 5-shot | params | latency ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["accuracy"]
        print(f"| {Path(r['run']).name} | {r['learner']} | {r['step']} | {a['5w1s']['mean']:.2f} +- {a['5w1s']['ci95']:.2f} "
              f"| {a['5w5s']['mean']:.2f} +- {a['5w5s']['ci95']:.2f} | {r['params'] / 1e6:.3f} M | {r['latency_ms']:.2f} |")
    for name, (one, five) in PUBLISHED.items():
        print(f"| {name} (published) | | | {one:.2f} | {five:.2f} | | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "episodes": args.episodes, "seed": 1234}
    args.out.write_text(json.dumps({"meta": meta, "published": PUBLISHED, "runs": rows}, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(f"raw: {args.out}; plot: {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
