"""Hyper-parameter search on Omniglot: an Optuna study (`fewshot.workflows.tune` over the space of
configs/tune_protonet_omniglot.yaml) against the hand-written config (configs/protonet_omniglot.yaml)
at the same training budget.

Every trial and the hand config train `--steps` episodes (validation every steps / 4 on the hand
config's 20-way 1-shot validation episodes, which score the trials). The best trial's run and the
hand run are then evaluated by the field's protocol on the test classes (600 fixed-seed episodes,
95% CI; 5-way 1-shot, 5-way 5-shot and the config's 20-way 1-shot) and on the validation classes.
The study is resumable: a re-run adds only the trials still missing and reuses finished runs.

    python benchmarks/bench_tune.py --trials 12 --steps 300 --val-episodes 100 --replicates 4
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TASKS = [("test", 5, 1), ("test", 5, 5), ("test", 20, 1), ("val", 5, 1)]


def base_config(args: argparse.Namespace, config: str, name: str) -> Any:
    """`configs/<config>` at the benchmark's budget, named `name`, in the benchmark's run folder."""
    from fewshot.config import config_from_dict

    data = yaml.safe_load((ROOT / "configs" / config).read_text(encoding="utf-8"))
    every = max(1, args.steps // 4)
    data["train"] = {**data["train"], "steps": args.steps, "val_every": every, "checkpoint_every": args.steps,
                     "val_episodes": args.val_episodes}
    if "tune" in data:
        data["tune"] = {**data["tune"], "warmup_steps": every}
    return config_from_dict({**data, "name": name, "output_dir": args.runs}, "bench_tune")


def evaluate(run_dir: Path, data: Any, tasks: list[tuple[str, int, int]] = TASKS) -> dict[str, Any]:
    from fewshot.training.protocol import evaluate_run

    out = {}
    for split, way, shot in tasks:
        res = evaluate_run(run_dir, way=way, shot=shot, episodes=600, seed=1234, split=split, data=data,
                           progress=False, device="cpu")
        out[f"{split}_{way}w{shot}s"] = {"mean": res.mean, "ci95": res.ci95}
    return out


def main() -> None:
    from fewshot.config import load_config
    from fewshot.training.data import load_run_data
    from fewshot.training.loop import train
    from fewshot.training.protocol import evaluate_run  # noqa: F401  (imported before the long run)
    from fewshot.workflows.study import open_study, storage_url, study_dir
    from fewshot.workflows.tune import tune, write_outputs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12, help="trials the study should hold in the end")
    p.add_argument("--steps", type=int, default=300, help="training episodes per trial and for the hand config")
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--timeout-min", type=float, default=45.0, help="start no new trial after this")
    p.add_argument("--runs", default="runs/bench-tune")
    p.add_argument("--out", default="benchmarks/results/tune.json")
    p.add_argument("--replicates", type=int, default=4,
                   help="also train the hand and the best config with seeds 1 .. N-1 (test 5w1s / 5w5s)")
    args = p.parse_args()

    tuned_cfg = base_config(args, "tune_protonet_omniglot.yaml", "protonet-omniglot")
    hand_cfg = base_config(args, "protonet_omniglot.yaml", "protonet-omniglot-hand")
    data = load_run_data(tuned_cfg.data, progress=False)

    t0 = time.perf_counter()
    folder = study_dir(tuned_cfg)
    have = 0
    if (folder / "trials.json").is_file():
        have = sum(1 for r in json.loads((folder / "trials.json").read_text())["trials"]
                   if r["state"] in ("complete", "pruned"))
    if have < args.trials:
        result = tune(tuned_cfg, trials=args.trials - have, timeout=60 * args.timeout_min, data=data,
                      progress=False)
    else:  # the study is complete: its outputs only
        url = storage_url(None, folder)
        result = write_outputs(tuned_cfg, open_study(tuned_cfg, url, tuned_cfg.name), folder, url)
    study_s = time.perf_counter() - t0
    assert result.best_config is not None, "no trial completed"
    summary = json.loads((folder / "trials.json").read_text())
    best_run = folder / f"trial-{summary['best_trial']:04d}"

    t1 = time.perf_counter()
    hand = train(hand_cfg, data=data, progress=False)
    hand_s = time.perf_counter() - t1
    rows = {
        "hand": {"run": str(hand_cfg.run_dir()), "best_val_acc_20w1s": hand.best_val_acc,
                 "config": {k: v for k, v in hand_cfg.to_dict()["train"].items() if k in
                            ("lr", "way", "shot", "query", "weight_decay")} | {"hidden": 64},
                 "eval": evaluate(hand_cfg.run_dir(), data)},
        "tuned": {"run": str(best_run), "best_val_acc_20w1s": result.best_value, "params": result.best_params,
                  "eval": evaluate(best_run, data)},
    }
    best_cfg = load_config(result.best_config)
    assert best_cfg.tune is None  # a runnable config for `fewshot train`
    for seed in range(1, args.replicates):
        for key, cfg in (("hand", hand_cfg), ("tuned", best_cfg)):
            rep = cfg.model_copy(update={"seed": seed, "name": f"{cfg.name}-seed{seed}", "output_dir": args.runs})
            res = train(rep, data=data, progress=False)
            rows[key].setdefault("replicates", {})[str(seed)] = {
                "run": str(rep.run_dir()), "best_val_acc_20w1s": res.best_val_acc,
                "eval": evaluate(rep.run_dir(), data, TASKS[:2])}
    print(f"\n{'':8s} {'val 20w1s (search)':>20s} " + " ".join(f"{k:>18s}" for k in rows["hand"]["eval"]))
    for name, row in rows.items():
        cells = " ".join(f"{100 * v['mean']:8.2f} +- {100 * v['ci95']:4.2f}%" for v in row["eval"].values())
        print(f"{name:8s} {100 * row['best_val_acc_20w1s']:19.2f}% {cells}")
    for name, row in rows.items():
        for seed, rep in row.get("replicates", {}).items():
            cells = " ".join(f"{100 * v['mean']:8.2f} +- {100 * v['ci95']:4.2f}%" for v in rep["eval"].values())
            print(f"{name + ' s' + seed:8s} {100 * rep['best_val_acc_20w1s']:19.2f}% {cells}")
    print(f"best params: {result.best_params}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    for src, dst in (("history", "tune_history.png"), ("importance", "tune_importance.png")):
        if src in result.files:
            shutil.copyfile(result.files[src], results / dst)
    out = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "cpus": torch.get_num_threads(),
           "command": " ".join(["python", *sys.argv]), "steps_per_trial": args.steps,
           "val_episodes": args.val_episodes, "tune": tuned_cfg.to_dict()["tune"], "counts": result.counts,
           "study_seconds_this_session": round(study_s, 1), "hand_train_seconds_this_session": round(hand_s, 1),
           "train_seconds_total": {k: json.loads((Path(r["run"]) / "train_summary.json").read_text())[
               "train_seconds_total"] for k, r in rows.items()},
           "best_config": str(result.best_config), "importances": summary["importances"],
           "notes": summary["notes"], "trials": summary["trials"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"raw: {args.out}")


if __name__ == "__main__":
    main()
