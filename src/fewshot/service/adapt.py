"""A workspace that learns from use: the teach page's "Train" step.

`adapt_workspace` measures the workspace's candidate heads on its own stored examples
(`fewshot.decision.heldout.choose_head`: the nearest prototype first, then the L2-normalised
logistic probe refitted per fold), under the workspace's metric and unknown threshold, so an answer
of "unknown" counts against a head as it would for a user. The probe is kept only when it answers
strictly more held-out examples right. The switch is one settings transaction that applies only if
the workspace is still at the version that was measured (a class taught meanwhile gets a conflict,
and nothing changes); it bumps the version, so every replica serves the new head on its next call.

The report is stored with the settings (`adapted`), so the API and the page show what was
measured; changing the head or metric by hand clears it. Cost: one computation at a time per
process (the route's gate) and at most `MAX_ADAPT_SCORES` example x class scores (the probe is
refitted once per fold).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from fewshot.decision.heldout import choose_head
from fewshot.service.heads import SERVICE_HEADS, service_head
from fewshot.service.insight import check_insight_size, stored_embeddings
from fewshot.service.recogniser import Recogniser
from fewshot.service.store import ConflictError, WorkspaceRecord
from fewshot.service.workspace_settings import WorkspaceSettings

MAX_ADAPT_CLASSES = 100
MAX_ADAPT_SCORES = 100_000  # stored examples x classes: 50 classes x 40 images, 20 x 100, ...


def adapt_workspace(recogniser: Recogniser, workspace_id: str, *, max_classes: int = MAX_ADAPT_CLASSES,
                    max_scores: int = MAX_ADAPT_SCORES) -> tuple[dict[str, Any], WorkspaceRecord]:
    """Measure, choose and switch (module docstring); returns the report and the workspace after it."""
    record = recogniser.workspace(workspace_id)
    settings = WorkspaceSettings.from_dict(record.settings)
    p = recogniser.decision_state(workspace_id, current=record).protos
    check_insight_size(int(p.counts.sum()), len(p.class_ids), max_classes=max_classes, max_scores=max_scores,
                       what="training on the workspace's examples")
    if p.version != record.version:
        raise ConflictError(f"workspace {workspace_id!r} changed while it was read (version {record.version} -> "
                            f"{p.version}); nothing was changed: try again")
    x, y = stored_embeddings(recogniser, workspace_id, p)
    candidates = [replace(settings, head=h).served(recogniser.decision) for h in SERVICE_HEADS]
    choice = choose_head(candidates, x, y, len(p.class_ids))
    head = settings.head if choice.chosen is None else service_head(choice.chosen)
    report = {"scores": [{**sc.to_dict(), "head": service_head(sc.head)} for sc in choice.scores],
              "folds": choice.folds, "why": choice.why(service_head),
              "chosen": None if choice.chosen is None else head, "previous": settings.head, "head": head,
              "changed": head != settings.head, "measured_version": record.version, "classes": len(p.class_ids),
              "examples": len(y), "measured_unix": round(time.time(), 3)}

    def switch(current: dict[str, Any]) -> dict[str, Any]:
        return {**WorkspaceSettings.from_dict(current).to_dict(), "head": head, "adapted": report}

    return report, recogniser.store.merge_workspace_settings(workspace_id, switch, if_version=record.version)
