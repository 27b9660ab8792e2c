"""The served decision: one frozen description, one function (`decide`).

A `ServedDecision` is the head (`DecisionRule`: nearest prototype or probe, metric, cosine scale,
probe C and max_iter) plus the open-set rule that accepts or rejects its answer (`OpenSetRule`,
with its threshold; None: every answer stands). `decide` applies it to a class memory
(`fewshot.decision.memory`) and query embeddings:

    scores (N, K)         squared distances ("euclidean") or cosine similarities to the prototypes
    logits (N, K)         -d^2 or cosine_scale * cos (prototype head); the probe's logits (probe head)
    probabilities (N, K)  softmax of the logits
    label (N,)            the head's class: the nearest prototype, or the probe's most likely class
                          (first index on exact ties)
    score (N,)            the label's score: the class that is answered is the class that is judged
    novelty (N,)          the open-set rule's novelty for the label's class (None without a rule;
                          a rule with a centre judges the label's cosine measured from it)
    known (N,)            novelty <= threshold

A probe head needs 2 or more classes; with one class the prototype head answers. The ONNX form of
the same object is `fewshot.decision.onnx_form.decision_graph`. A bundle carries a
`BundleDecision` (the head and one open-set rule per metric, `Manifest.decision`), of which a
workspace serves one `ServedDecision` (`BundleDecision.served`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import numpy as np
import torch

from fewshot.decision.memory import ClassMemory
from fewshot.decision.openset import OpenSetRule
from fewshot.decision.rule import (
    DecisionRule,
    Metric,
    Probe,
    check_metric,
    fit_probe,
    scores_to_logits,
)
from fewshot.errors import ConfigError

Head = Literal["prototype", "probe"]


class Memory(Protocol):
    """What `decide` reads of a class memory (`ClassMemory`, `LeaveOneOut`)."""

    @property
    def probe(self) -> Probe | None: ...

    @property
    def n_classes(self) -> int: ...

    def scores(self, q: np.ndarray, metric: Metric) -> np.ndarray: ...

    def judged(self, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def shifted(self, centre: np.ndarray) -> Memory: ...


@dataclass(frozen=True)
class ServedDecision:
    """The head and the open-set rule (with its threshold) of one served decision."""

    rule: DecisionRule = DecisionRule()
    open_set: OpenSetRule | None = None

    def __post_init__(self) -> None:
        if self.open_set is not None and self.open_set.metric != self.rule.metric:
            raise ConfigError(f"open-set rule of metric {self.open_set.metric!r} cannot judge a {self.rule.metric!r} "
                              "head; use the bundle's rule for that metric (BundleDecision.served)")

    @property
    def metric(self) -> Metric:
        return self.rule.metric

    @property
    def uses_probe(self) -> bool:
        return self.rule.rule == "probe"

    @property
    def threshold(self) -> float | None:
        return None if self.open_set is None else self.open_set.threshold


@dataclass(frozen=True)
class BundleDecision:
    """What a bundle serves (`Manifest.decision`): its head and one open-set rule per calibrated
    metric (a workspace may switch metric; each rule's threshold is on its own novelty scale)."""

    rule: DecisionRule = DecisionRule()
    open_set: Mapping[Metric, OpenSetRule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for m, r in self.open_set.items():
            if check_metric(m) != r.metric:
                raise ConfigError(f"open-set rule stored under {m!r} has metric {r.metric!r}; store each rule "
                                  "under its own metric")

    def served(self, metric: Metric | None = None, head: Head | None = None,
               threshold: float | None = None) -> ServedDecision:
        """The decision of a workspace that chose `metric` / `head` (None: the bundle's) and
        `threshold` (None: the calibrated one). A threshold without a calibrated rule makes a
        "global" rule (novelty = d^2, or 1 - cos); without either, every answer is accepted."""
        m = check_metric(metric or self.rule.metric)
        rule = replace(self.rule, metric=m, rule=head or self.rule.rule)
        base = self.open_set.get(m)
        if threshold is None:
            return ServedDecision(rule, base)
        return ServedDecision(rule, replace(base, threshold=threshold) if base else OpenSetRule("global", m, threshold))

    def with_thresholds(self, thresholds: Mapping[Metric, float]) -> BundleDecision:
        """The service-wide threshold overrides applied to the rules (on their novelty scale)."""
        rules = dict(self.open_set)
        for m, t in thresholds.items():
            rules[m] = self.served(m, threshold=t).open_set or OpenSetRule("global", m, t)
        return replace(self, open_set=rules)

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule.to_dict(), "open_set": {m: r.to_dict() for m, r in self.open_set.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> BundleDecision:
        if not isinstance(d, Mapping) or set(d) - {"rule", "open_set"}:
            raise ConfigError(f"decision {d!r} must be a mapping with 'rule' and 'open_set'; produce it with "
                              "BundleDecision.to_dict()")
        rule, rules = d.get("rule"), d.get("open_set") or {}
        if not isinstance(rules, Mapping) or not (rule is None or isinstance(rule, dict)):
            raise ConfigError(f"decision {d!r}: 'rule' must be a DecisionRule dict and 'open_set' map metric -> rule")
        return cls(DecisionRule.from_dict(rule), {check_metric(str(m)): OpenSetRule.from_dict(r) for m, r in rules.items()})

    @classmethod
    def from_legacy(cls, deployment: Mapping[str, object] | None,
                    calibration: Mapping[str, object] | None) -> BundleDecision:
        """The documented mapping of manifests written before `Manifest.decision`: the head from
        `deployment["rule"]` (absent: nearest prototype, Euclidean), the open-set rules from
        `calibration["rules"]`, or else each legacy raw-score threshold of `calibration["thresholds"]`
        as a "global" rule with the same decisions (accept d^2 <= t, or cos >= t)."""
        raw = (deployment or {}).get("rule")
        rule = DecisionRule.from_dict(raw if isinstance(raw, dict) else None)
        cal = calibration or {}
        rules, legacy = cal.get("rules") or {}, cal.get("thresholds") or {}
        if not isinstance(rules, Mapping) or not isinstance(legacy, Mapping):
            raise ConfigError(f"calibration {dict(cal)!r} is malformed: 'rules' and 'thresholds' map metric -> value")
        if rules:
            return cls(rule, {check_metric(str(m)): OpenSetRule.from_dict(r) for m, r in rules.items()})
        return cls(rule, {check_metric(str(m)): OpenSetRule.from_legacy_threshold(check_metric(str(m)), float(t))
                          for m, t in legacy.items()})


@dataclass(frozen=True)
class Answer:
    """`decide`'s answer for N queries over K classes (module docstring). `preference` (N, K) is
    what `label` maximises: -d^2 or cos for a prototype head, the logits for a probe."""

    scores: np.ndarray
    logits: np.ndarray
    probabilities: np.ndarray
    preference: np.ndarray
    label: np.ndarray
    score: np.ndarray
    novelty: np.ndarray | None
    known: np.ndarray

    def top(self, i: int, k: int) -> np.ndarray:
        """Query i's `k` best classes, the label first (stable on ties)."""
        return np.argsort(-self.preference[i], kind="stable")[:k]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def fit_memory(decision: ServedDecision, x: np.ndarray, y: np.ndarray, n_classes: int) -> ClassMemory:
    """The memory of embeddings x (N, D) with classes y (N,), with the probe fitted (the decision's
    C and max_iter) when its head is a probe and there are 2 or more classes."""
    probe = None
    if decision.uses_probe and n_classes > 1:
        r = decision.rule
        probe = fit_probe(_t(x), torch.from_numpy(np.asarray(y, np.int64)), n_classes, c=r.probe_c,
                          max_iter=r.probe_max_iter)
    return ClassMemory.of(x, y, n_classes, probe)


def judged_score(rule: OpenSetRule, memory: Memory, q: np.ndarray, label: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(N,) the score the open-set rule judges: the label's `score`, or with the rule's centre c the
    cosine of q - c to the label's prototype moved by -c (the memory `shifted` by c)."""
    c = rule.centre_array
    if c is None:
        return score
    centred = memory.shifted(c).scores(np.asarray(q, np.float32) - c, "cosine")
    return np.asarray(centred[np.arange(len(label)), label], np.float64)


def decide(decision: ServedDecision, memory: Memory, q: np.ndarray) -> Answer:
    """Query embeddings q (N, D) -> the served `Answer` over the classes of `memory`."""
    if memory.n_classes == 0:
        raise ValueError("the decision needs at least one class; teach a class first")
    metric = decision.metric
    scores = memory.scores(q, metric)
    probe = memory.probe if decision.uses_probe and memory.n_classes > 1 else None
    if decision.uses_probe and memory.n_classes > 1 and probe is None:
        raise ValueError("a probe head needs the memory's fitted probe; build the memory with fit_memory")
    if probe is not None:
        logits = probe.logits(_t(q)).numpy()
        preference = logits
    else:
        logits = scores_to_logits(scores, metric, float(decision.rule.cosine_scale))
        preference = -scores if metric == "euclidean" else scores
    label = preference.argmax(1)
    score = scores[np.arange(len(label)), label]
    rule = decision.open_set
    if rule is None:
        return Answer(scores, logits, softmax(logits), preference, label, score, None, np.ones(len(label), bool))
    novelty = rule.novelty(judged_score(rule, memory, q, label, score), *memory.judged(label),
                           n_classes=memory.n_classes)
    return Answer(scores, logits, softmax(logits), preference, label, score, novelty,
                  np.asarray(rule.accepts(novelty), bool))



def episode(rule: DecisionRule, zs: np.ndarray, ys: np.ndarray, n_way: int, zq: np.ndarray) -> Answer:
    """The served head `rule` (no open-set rule) over the memory of support embeddings zs (S, D)
    with labels ys (S,) in 0..n_way-1, answering queries zq (Q, D): how export measures a bundle as
    served, how quantisation checks it and how a distillation teacher answers an episode."""
    decision = ServedDecision(rule)
    return decide(decision, fit_memory(decision, zs, ys, n_way), zq)
