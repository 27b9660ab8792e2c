"""The report of one distillation: teachers, the student trained alone with the same budget, and
every distilled generation, on identical evaluation episodes (mean +- 95% CI), with parameters,
ONNX size on disk and CPU latency per image (ONNX Runtime, batch 1, one thread); a plot of
accuracy against latency. Written to `<output_dir>/<name>-report/` and shown by `fewshot compare`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from fewshot.artifacts.embedders import OnnxEmbedder
from fewshot.artifacts.onnx_export import export_onnx
from fewshot.backbones.base import Backbone
from fewshot.config import RunConfig
from fewshot.data.imageio import Preprocessing
from fewshot.distill.teacher import load_teachers
from fewshot.episodes.sampling import EpisodeSpec
from fewshot.io import atomic_write_json, atomic_write_text
from fewshot.training.data import RunData
from fewshot.training.evaluate import EvalResult, evaluate_episodes
from fewshot.training.runs import load_trained

REPORT_JSON = "distill_report.json"


def report_dir(config: RunConfig) -> Path:
    return Path(config.output_dir) / f"{config.name}-report"


def measure_model(backbone: Backbone, channels: int, size: int, *, runs: int = 300) -> dict[str, float]:
    """Parameters, ONNX bytes and median batch-1 latency (ms) in ONNX Runtime with one thread."""
    backbone = backbone.float().cpu().eval()
    params = sum(p.numel() for p in backbone.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(backbone, path, channels=channels, size=size)
        nbytes = path.stat().st_size
        pre = Preprocessing("L" if channels == 1 else "RGB", size)
        emb = OnnxEmbedder(path, pre, embedding_dim=backbone.embedding_dim,
                           intra_op_threads=1)
        x = np.random.default_rng(0).integers(0, 256, (1, channels, size, size), dtype=np.uint8)
        for _ in range(20):
            emb.embed(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            emb.embed(x)
            times.append(time.perf_counter() - t0)
    return {"params": float(params), "onnx_bytes": float(nbytes), "latency_ms": 1000 * statistics.median(times)}


def _evaluate(predict: Any, data: RunData, config: RunConfig, task: tuple[int, int]) -> EvalResult:
    ev = config.eval
    return evaluate_episodes(predict, data.cache, data.pool(ev.split), EpisodeSpec(task[0], task[1], ev.query),
                             episodes=ev.episodes, seed=ev.seed, mode=ev.domain_mode, progress=False)


def _row(name: str, role: str, predictors: dict[str, EvalResult], size: dict[str, float]) -> dict[str, Any]:
    return {"name": name, "role": role, **size,
            "accuracy": {k: {"mean": r.mean, "ci95": r.ci95, "episodes": r.episodes} for k, r in predictors.items()}}


def write_report(config: RunConfig, generations: list[RunConfig], alone: RunConfig | None, *, data: RunData,
                 progress: bool = True, tasks: list[tuple[int, int]] | None = None) -> Path:
    """Evaluate every model on the same episodes, measure it, write JSON + markdown + plot."""
    assert config.distill is not None
    tasks = tasks or [(config.eval.way, config.eval.shot)]
    pre = data.cache.preprocessing
    rows = []
    for t in load_teachers(config.distill, data, torch.device("cpu")):
        accs = {f"{w}w{s}s": _evaluate(t.predict, data, config, (w, s)) for w, s in tasks}
        rows.append(_row(t.source, "teacher", accs, measure_model(t.backbone, t.channels, t.size)))
    students = ([(alone, "student alone")] if alone is not None else []) + [
        (g, f"distilled (generation {i + 1})") for i, g in enumerate(generations)]
    for cfg, role in students:
        learner, _ = load_trained(cfg.run_dir())
        accs = {f"{w}w{s}s": _evaluate(learner.predict, data, config, (w, s)) for w, s in tasks}
        rows.append(_row(cfg.name, role, accs, measure_model(learner.backbone, pre.channels, pre.size)))
    out = report_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    report = {"name": config.name, "split": f"{data.scheme}/{config.eval.split}", "episodes": config.eval.episodes,
              "seed": config.eval.seed, "mode": config.eval.domain_mode, "tasks": [f"{w}w{s}s" for w, s in tasks],
              "train_steps": config.train.steps, "distill": config.distill.model_dump(mode="json"),
              "torch": torch.__version__, "rows": rows}
    atomic_write_json(out / REPORT_JSON, report)
    atomic_write_text(out / "distill_report.md", report_markdown(report))
    plot_report(report, out / "accuracy_vs_latency.png")
    return out


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"### Distillation report: {report['name']} ({report['split']}, {report['episodes']} episodes, "
             f"seed {report['seed']}, mode {report['mode']})", "",
             "| model | role | " + " | ".join(report["tasks"]) + " | params | ONNX MB | CPU ms/image |",
             "|---|---|" + "---|" * len(report["tasks"]) + "---|---|---|"]
    for r in report["rows"]:
        accs = " | ".join(f"{100 * r['accuracy'][t]['mean']:.2f} +- {100 * r['accuracy'][t]['ci95']:.2f}"
                          for t in report["tasks"])
        lines.append(f"| {Path(r['name']).name} | {r['role']} | {accs} | {int(r['params']):,} | "
                     f"{r['onnx_bytes'] / 1e6:.2f} | {r['latency_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], out: Path) -> Path:
    task = report["tasks"][0]
    fig = Figure(figsize=(6.4, 4.2))  # not pyplot: the process's backend is left alone
    ax = fig.subplots()
    for r in report["rows"]:
        a = r["accuracy"][task]
        ax.errorbar(r["latency_ms"], 100 * a["mean"], yerr=100 * a["ci95"], marker="o", capsize=3,
                    label=f"{Path(r['name']).name} ({r['role']})")
    ax.set_xscale("log")
    ax.set_xlabel("CPU latency per image, ms (ONNX Runtime, batch 1, 1 thread)")
    ax.set_ylabel(f"{task} accuracy (%), 95% CI")
    ax.set_title(f"{report['name']}: accuracy vs latency")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def load_report(path: Path) -> dict[str, Any] | None:
    f = Path(path) / REPORT_JSON
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
