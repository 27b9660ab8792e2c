"""What the recogniser answers: a prediction per image (its top-k candidates, the open-set verdict,
the out-of-domain flag) and an explanation (the nearest stored examples)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewshot.decision import Answer, Metric, ServedDecision
from fewshot.service.labels import UNKNOWN
from fewshot.service.memory import Prototypes
from fewshot.service.verdict import verdict


@dataclass(frozen=True)
class Candidate:
    class_id: str
    label: str
    probability: float
    score: float  # squared distance (euclidean) or cosine similarity to the class prototype


@dataclass(frozen=True)
class Prediction:
    label: str  # a class label, or "unknown"
    class_id: str | None
    known: bool
    probability: float
    score: float  # the answered class's score (squared distance or cosine similarity to its prototype)
    novelty: float | None  # the open-set rule's novelty of the query for the answered class
    threshold: float | None  # accepted when novelty <= threshold; None: no rule, always accepted
    metric: Metric
    top_k: list[Candidate]
    rule: str | None = None  # the open-set rule's kind ("spread", "global")
    out_of_domain: bool = False  # far outside the images the model was trained on (still classified)
    domain_score: float | None = None  # > 1: out of domain; None: the bundle has no domain summary
    domain_reasons: tuple[str, ...] = ()  # for end users, e.g. "a colour image sent to a model trained on ..."
    effective_threshold: float | None = None  # the answered class's own threshold (`fewshot.service.verdict`)
    threshold_why: dict[str, Any] | None = None  # which threshold the workspace uses and why (`OpenSetRule.explain`)
    confidence: float = 0.0  # on the decision's scale: >= 0.5 exactly when known (`fewshot.service.verdict`)
    summary: str = ""  # the answer and why, in words
    advice: str = ""  # what to do next


@dataclass(frozen=True)
class Neighbour:
    example_id: str
    class_id: str
    label: str
    score: float
    thumbnail_png: bytes


@dataclass(frozen=True)
class Explanation:
    prediction: Prediction
    neighbours: list[Neighbour]



def prediction_of(p: Prototypes, a: Answer, i: int, decision: ServedDecision, top_k: int,
                  calibrated: float | None = None) -> Prediction:
    """Query i of `a` as the service answers it (calibrated: the bundle's threshold for the metric)."""
    cands = [Candidate(p.class_ids[j], p.labels[j], float(a.probabilities[i, j]), float(a.scores[i, j]))
             for j in a.top(i, min(top_k, len(p.class_ids)))]
    label, known, rule = int(a.label[i]), bool(a.known[i]), decision.open_set
    probability, novelty = float(a.probabilities[i, label]), None if a.novelty is None else float(a.novelty[i])
    v = verdict(decision, p.counts, label, p.labels[label], known, probability, novelty, calibrated)
    return Prediction(p.labels[label] if known else UNKNOWN, p.class_ids[label] if known else None, known,
                      probability, float(a.score[i]), novelty, decision.threshold, decision.metric, cands,
                      None if rule is None else rule.kind, effective_threshold=v.effective_threshold,
                      threshold_why=v.threshold_why, confidence=v.confidence, summary=v.summary, advice=v.advice)
