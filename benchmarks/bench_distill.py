"""The Omniglot distillation benchmark: teacher, the same student trained alone with the same
budget, the distilled student, and a born-again generation (the distilled student teaching a copy
of itself), all on identical fixed-seed test episodes, with parameters, ONNX size and CPU latency
per image (ONNX Runtime, batch 1, one thread). Train the teacher first:

    fewshot train configs/distill/teacher_omniglot.yaml
    python benchmarks/bench_distill.py --generations 2 --out benchmarks/results/distill_omniglot.json

Finished runs are resumed (not retrained), so the command can be re-run to redo the report only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = [(5, 1), (5, 5), (20, 1), (20, 5)]


def main() -> None:
    from fewshot.config import load_config
    from fewshot.distill import distill
    from fewshot.distill.report import load_report, report_markdown, write_report
    from fewshot.distill.task import baseline_config, generation_configs
    from fewshot.training.data import load_run_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "distill" / "student_omniglot.yaml"))
    p.add_argument("--generations", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/distill_omniglot.json")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    config = load_config(args.config, [f"distill.generations={args.generations}", *args.overrides])
    data = load_run_data(config.data, progress=False)
    distill(config, data=data, report=False)
    gens = generation_configs(config)
    folder = write_report(config, gens, baseline_config(config), data=data, tasks=TASKS)
    report = load_report(folder)
    assert report is not None
    print(report_markdown(report))
    summaries = {cfg.name: json.loads((cfg.run_dir() / "train_summary.json").read_text())
                 for cfg in [*gens, baseline_config(config)]}
    out = {"date": str(date.today()), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "command": " ".join(["python", *sys.argv]), "report": report,
           "train_summaries": summaries}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"raw: {args.out}; plot: {folder / 'accuracy_vs_latency.png'}")


if __name__ == "__main__":
    main()
