"""Accuracy of every learner on Omniglot under the field's protocol, trained side by side.

Each run trains from its config in `configs/` with a wall-clock budget (train.max_seconds), then
is evaluated on the test classes of its split with 1000 fixed-seed episodes per setting (mean
accuracy and 95% CI). Runs train in parallel subprocesses (useful on a GPU machine).

    python benchmarks/bench_accuracy.py --budget 300 --parallel 8 --out benchmarks/results/accuracy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "protonet": ("configs/protonet_omniglot.yaml", []),
    "maml": ("configs/maml_omniglot.yaml", []),
    "fomaml": ("configs/fomaml_omniglot.yaml", []),
    "anil": ("configs/anil_omniglot.yaml", []),
    "metasgd": ("configs/metasgd_omniglot.yaml", []),
    "reptile": ("configs/reptile_omniglot.yaml", []),
    "pretrain": ("configs/pretrain_omniglot.yaml", []),
    "protonet-lake": ("configs/protonet_lake.yaml", []),
}
VINYALS_SETTINGS = [(5, 1, "any"), (5, 5, "any"), (20, 1, "any"), (20, 5, "any")]
LAKE_SETTINGS = [(20, 1, "within"), (20, 1, "any")]


def fewshot(*args: str) -> list[str]:
    return [sys.executable, "-m", "fewshot.cli", *args]


def train_cmd(name: str, budget: float, out_dir: str, extra: list[str]) -> list[str]:
    cfg, overrides = RUNS[name]
    return fewshot("train", str(ROOT / cfg), f"output_dir={out_dir}", f"train.max_seconds={budget}",
                   "--no-resume", *overrides, *extra)


def eval_cmds(name: str, run_dir: Path, episodes: int) -> list[list[str]]:
    settings = LAKE_SETTINGS if name.endswith("lake") else VINYALS_SETTINGS
    return [fewshot("evaluate", str(run_dir), "--way", str(w), "--shot", str(s), "--mode", m,
                    "--episodes", str(episodes)) for w, s, m in settings]


def run_one(name: str, args: argparse.Namespace, log_path: Path) -> subprocess.Popen[bytes]:
    """Train then evaluate one run in a child shell, logging to `log_path`."""
    run_dir = Path(args.output_dir) / _run_name(name)
    cmds = [train_cmd(name, args.budget, args.output_dir, args.extra), *eval_cmds(name, run_dir, args.episodes)]
    script = " && ".join(" ".join(f"'{a}'" for a in c) for c in cmds)
    log = open(log_path, "w")  # noqa: SIM115
    threads = str(max(1, (os.cpu_count() or 2) // max(1, args.parallel)))  # no oversubscription
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def collect(name: str, args: argparse.Namespace) -> list[dict[str, object]]:
    run_dir = Path(args.output_dir) / _run_name(name)
    summary_path = run_dir / "train_summary.json"
    if not summary_path.is_file():
        print(f"{name}: training failed, see {Path(args.output_dir) / 'logs' / (name + '.log')}")
        return []
    summary = json.loads(summary_path.read_text())
    rows: list[dict[str, object]] = []
    settings = LAKE_SETTINGS if name.endswith("lake") else VINYALS_SETTINGS
    for way, shot, mode in settings:
        res_path = run_dir / f"eval-test-{way}w{shot}s-{mode}.json"
        if not res_path.is_file():
            print(f"{name} {way}w{shot}s {mode}: no evaluation")
            continue
        r = json.loads(res_path.read_text())
        rows.append({"run": name, "way": way, "shot": shot, "mode": mode, "mean": r["mean"], "ci95": r["ci95"],
                     "episodes": r["episodes"], "train_steps": summary["steps"],
                     "train_seconds": summary["train_seconds_this_session"], "device": summary["device"],
                     "precision": summary["precision"], "best_val_acc": summary["best_val_acc"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", nargs="*", default=list(RUNS))
    ap.add_argument("--budget", type=float, default=300, help="training seconds per run")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--output-dir", default="runs/bench")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run, e.g. train.device=cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/accuracy.json"))
    args = ap.parse_args()
    logs = Path(args.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    subprocess.run(fewshot("prepare"), check=True, cwd=ROOT)  # build the shared cache once
    pending, running, started = list(args.runs), {}, time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            running[name] = run_one(name, args, logs / f"{name}.log")
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                print(f"[{time.time() - started:6.0f}s] {name}: exit {proc.returncode}", flush=True)
                del running[name]
        time.sleep(1)
    results = [row for name in args.runs for row in collect(name, args)]
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "budget_s": args.budget, "results": results}, indent=2))
    print("\n| run | task | mode | accuracy (95% CI) | train steps | train s | device |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['way']}-way {r['shot']}-shot | {r['mode']} | {100 * r['mean']:.2f} +- "  # type: ignore[operator]
              f"{100 * r['ci95']:.2f} | {r['train_steps']} | {r['train_seconds']:.0f} | {r['device']} {r['precision']} |")  # type: ignore[operator]


def _run_name(name: str) -> str:
    import yaml

    cfg = yaml.safe_load((ROOT / RUNS[name][0]).read_text())
    return str(cfg["name"])


if __name__ == "__main__":
    main()
