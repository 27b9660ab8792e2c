"""A workspace's decision settings (metric, head, unknown threshold) and the threshold's check."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fewshot.decision import METRICS, BundleDecision, DecisionRule, Metric, ServedDecision
from fewshot.service.errors import RequestError
from fewshot.service.heads import SERVICE_HEADS, ServiceHead, head_of, service_head


@dataclass(frozen=True)
class WorkspaceSettings:
    """Per-workspace decision rule; `threshold` overrides the bundle's calibrated one; `adapted`:
    the report of the last measurement that chose the head (`fewshot.service.adapt`; written by
    the service only, cleared when the head or metric is changed by hand)."""

    metric: Metric = "euclidean"
    head: ServiceHead = "prototype"
    threshold: float | None = None
    adapted: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """As stored and returned by the API; `adapted` only once a measurement wrote one."""
        d = asdict(self)
        if d["adapted"] is None:
            del d["adapted"]
        return d

    @classmethod
    def from_rule(cls, rule: DecisionRule) -> WorkspaceSettings:
        """The settings that apply a bundle's decision rule (a probe is the "logistic" head)."""
        return cls(metric=rule.metric, head=service_head(rule.rule))

    def served(self, bundle: BundleDecision, threshold: float | None = None) -> ServedDecision:
        """The decision this workspace serves: the bundle's, with its metric, head and threshold
        (`threshold`: a per-call override, checked)."""
        t = check_threshold(threshold) if threshold is not None else self.threshold
        return bundle.served(self.metric, head_of(self.head), t)

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: WorkspaceSettings | None = None, *,
                  given_by_user: bool = False) -> WorkspaceSettings:
        """Settings as stored, or (`given_by_user`) as a request gives them, without `adapted`."""
        unknown = set(d) - {"metric", "head", "threshold"} - (set() if given_by_user else {"adapted"})
        if unknown:
            raise RequestError(f"unknown workspace settings {sorted(unknown)}; valid: metric, head, threshold")
        adapted = d.get("adapted")
        if adapted is not None and not isinstance(adapted, dict):
            raise RequestError(f"stored setting 'adapted' must be a report object; got {type(adapted).__name__}")
        base = defaults or cls()
        metric, head = d.get("metric", base.metric), d.get("head", base.head)
        if metric not in METRICS:
            raise RequestError(f"metric {metric!r} is not supported; use one of {list(METRICS)}")
        if head not in SERVICE_HEADS:
            raise RequestError(f"head {head!r} is not supported; use 'prototype' or 'logistic'")
        t = d.get("threshold")
        return cls(metric=metric, head=head, threshold=None if t is None else check_threshold(t), adapted=adapted)


def check_threshold(t: object) -> float:
    """A finite number >= 0 (nan, +-inf and negative values would silently reject or accept everything)."""
    try:
        f = float(t) if not isinstance(t, bool) and isinstance(t, int | float | np.floating) else math.nan
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise RequestError(f"threshold {str(t)[:40]!r} must be a finite number; omit it to use the calibrated one")
    if f < 0:
        raise RequestError(f"threshold {f:g} is below 0: novelty is never negative, so every answer would be "
                          "'unknown'; give a threshold >= 0 (larger accepts more), or omit it to use the calibrated one")
    return f

