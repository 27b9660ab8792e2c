"""`fewshot compare`: one markdown table and one bar plot of every evaluation of finished runs,
with distillation report folders shown as their report tables."""

from __future__ import annotations

from pathlib import Path

from fewshot.distill.report import load_report, report_markdown
from fewshot.errors import EpisodeError
from fewshot.training.plots import plot_comparison
from fewshot.training.protocol import load_results
from fewshot.training.runs import check_run_dir


def compare_runs(run_dirs: list[Path], out_png: Path) -> str:
    """A markdown table of every evaluation of every run, and a bar plot of the same numbers;
    distillation report folders (`<name>-report`) are shown as their report tables."""
    found = {p: load_report(p) for p in run_dirs}
    reports = [r for r in found.values() if r is not None]
    run_dirs = [p for p, r in found.items() if r is None]
    if not run_dirs:
        return "\n".join(report_markdown(r) for r in reports)
    rows: list[tuple[str, str, float, float]] = []
    lines = ["| run | learner | backbone | split | task | mode | episodes | accuracy (95% CI) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in run_dirs:
        results = load_results(check_run_dir(run))
        if not results:
            raise EpisodeError(f"run {run} has no evaluations; run `fewshot evaluate {run}` first")
        for r in results:
            task = f"{r['way']}-way {r['shot']}-shot"
            lines.append(
                f"| {r['run']} | {r['learner']} | {r['backbone']} | {r['split_scheme']}/{r['split']} | {task} | "
                f"{r['mode']} | {r['episodes']} | {100 * r['mean']:.2f} +- {100 * r['ci95']:.2f} |"
            )
            task_label = task if r["mode"] == "any" else f"{task} ({r['mode']})"
            if r["split"] != "test":
                task_label += f" [{r['split']}]"
            rows.append((r["run"], task_label, 100 * r["mean"], 100 * r["ci95"]))
    plot_comparison(rows, out_png, "few-shot accuracy (95% CI)")
    return "\n".join(lines + [""] + [report_markdown(r) for r in reports])
