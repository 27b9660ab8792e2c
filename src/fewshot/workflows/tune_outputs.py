"""What a study leaves behind: its trials as rows, trials.csv, parameter importances (PED-ANOVA)
and the history and importance plots."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

from fewshot.io import atomic_write_text


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        steps = sorted(t.intermediate_values)
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value,
                     "last_step": steps[-1] if steps else None,
                     "duration_s": round(t.duration.total_seconds(), 2) if t.duration is not None else None,
                     "params": dict(t.params),
                     "intermediate": {str(s): t.intermediate_values[s] for s in steps}})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    names = sorted({k for r in rows for k in r["params"]})
    head = ["number", "state", "value", "last_step", "duration_s", *names]
    lines = [head] + [[r[k] for k in head[:5]] + [r["params"].get(n, "") for n in names] for r in rows]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(["" if v is None else v for v in line] for line in lines)
    atomic_write_text(path, buf.getvalue())
    return path


def param_importances(study: Any, notes: list[str]) -> dict[str, float]:
    """PED-ANOVA importances (numpy only), or {} with a note saying why they cannot be computed."""
    import optuna

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    varying = {k for k in {k for t in complete for k in t.params}
               if len({json.dumps(t.params.get(k)) for t in complete}) > 1}
    if len(complete) < 2 or not varying:
        notes.append(f"parameter importance not computed: it needs >= 2 completed trials whose parameters vary "
                     f"(have {len(complete)} completed, {len(varying)} varying parameters); run more trials")
        return {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        notes.append(f"parameter importance not computed ({type(exc).__name__}: {exc}); run more trials")
        return {}
    notes += [f"parameter importance: {w.message} (with {len(complete)} completed trials; run more trials)"
              for w in caught if issubclass(w.category, UserWarning)
              and not issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    return {k: float(v) for k, v in imp.items()}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_history(rows: list[dict[str, Any]], path: Path) -> Path:
    """Each trial's score (pruned: its last reported value, hollow) and the best so far."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    done = [(r["number"], 100 * r["value"]) for r in rows if r["state"] == "complete"]
    pruned = [(r["number"], 100 * r["intermediate"][str(r["last_step"])]) for r in rows
              if r["state"] == "pruned" and r["intermediate"]]
    if done:
        x, y = zip(*done)
        ax.plot(x, y, "o", label="completed trial (best val acc)")
        best, running = [], -math.inf
        for v in y:
            running = max(running, v)
            best.append(running)
        ax.step(x, best, where="post", color="C3", label="best so far")
    if pruned:
        x, y = zip(*pruned)
        ax.plot(x, y, "o", mfc="none", color="C7", label="pruned trial (last val acc)")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("optimisation history")
    if done or pruned:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_importance(importances: dict[str, float], path: Path) -> Path:
    fig = _figure(7, 0.6 + 0.45 * len(importances))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (PED-ANOVA, normalised)")
    ax.set_title("parameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
