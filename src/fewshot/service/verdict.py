"""An answer in words: why an image is "unknown", its confidence on the decision's own scale, and
what to do next, all from the served decision's numbers (the API returns them; the page shows them).

Confidence scale ("fit"): novelty n against the threshold t (the open-set rule of
`fewshot.decision.openset`) as fit = clip(1 - n / (2 t), 0, 1): 100% = exactly like the taught
examples, 50% = the limit, 0% = twice as far as the limit. An answer is known exactly when
fit >= 50%, so the bar never reads more than 50% beside "unknown". Without an open-set rule the
fit is the forced choice's probability.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from fewshot.decision import ServedDecision

LIMIT = 0.5  # the fit at the threshold: known exactly when fit >= LIMIT


@dataclass(frozen=True)
class Verdict:
    confidence: float  # the fit, 0..1 (module doc); >= LIMIT exactly when known (with a rule)
    effective_threshold: float | None  # the answered class's threshold on the rule's base (shape: t(K, n) x t)
    threshold_why: dict[str, Any] | None  # `OpenSetRule.explain` for this workspace's classes
    summary: str  # the answer and why, in words
    advice: str  # what to do next


def count_groups(counts: np.ndarray) -> dict[int, int]:
    """(K,) examples per class -> {examples: how many classes have that many}."""
    return dict(sorted(Counter(int(c) for c in np.asarray(counts)).items()))


def threshold_why(decision: ServedDecision, counts: np.ndarray, calibrated: float | None = None) -> dict[str, Any] | None:
    """The threshold a workspace with these class counts uses, and why; None without a rule.
    calibrated: the bundle's own threshold for this metric (the served rule holds the workspace's)."""
    rule = decision.open_set
    if rule is None:
        return None
    out = rule.explain(len(counts), count_groups(counts))
    out["calibrated_threshold"] = calibrated
    out["setting"] = (f"The threshold ({rule.threshold:.4g}) multiplies t(K, n): 1.0 is the calibrated point, larger "
                      "accepts more, smaller answers 'unknown' more often." if rule.kind == "shape" else
                      f"The threshold ({rule.threshold:.4g}) is on this novelty scale: larger accepts more, smaller "
                      "answers 'unknown' more often.")
    return out


def effective_threshold(decision: ServedDecision, n_classes: int, count: int) -> float | None:
    """The threshold of a class with `count` examples among `n_classes`: t(K, n) x threshold on
    1 - centred cosine for the "shape" rule, the threshold itself (on novelty) for the others."""
    rule = decision.open_set
    if rule is None:
        return None
    if rule.kind == "shape":
        return float(rule.shape_threshold(max(n_classes, 1), np.asarray([count]))[0] * rule.threshold)
    return rule.threshold


def fit(novelty: float, threshold: float) -> float:
    """Novelty against the threshold on the 0..1 confidence scale (module doc)."""
    if threshold <= 0:
        return 1.0 if novelty <= threshold else 0.0
    return float(min(1.0, max(0.0, 1.0 - novelty / (2.0 * threshold))))


def verdict(decision: ServedDecision, counts: np.ndarray, answered: int, label: str, known: bool,
            probability: float, novelty: float | None, calibrated: float | None = None) -> Verdict:
    """The words and the confidence of one answer: `answered` is the index of the judged class
    (the forced choice), `counts` the (K,) examples per class of the memory it was decided on."""
    rule, n = decision.open_set, int(counts[answered])
    why = threshold_why(decision, counts, calibrated)
    eff = effective_threshold(decision, len(counts), n)
    if rule is None or novelty is None:
        return Verdict(probability, eff, why, f"'{label}': the nearest of your classes (no 'unknown' rule: every "
                       "image is answered with its nearest class).", f"If this is not '{label}', add examples of the "
                       "right class.")
    t = rule.threshold
    size = f" for a class with {n} example{'s' if n != 1 else ''}" if rule.kind == "shape" else ""
    if not known:
        return Verdict(fit(novelty, t), eff, why,
                       f"Not sure: this image is farther from '{label}' than the examples you taught (score "
                       f"{novelty:.2f} over the limit {t:.2f}{size}).",
                       f"Add more examples of '{label}' if it is one, or raise the threshold (now {t:.2f}; larger "
                       "accepts more). If it is none of your classes, 'unknown' is the right answer: teach it as a "
                       "new class to recognise it.")
    return Verdict(fit(novelty, t), eff, why,
                   f"'{label}': as close to '{label}' as the examples you taught (score {novelty:.2f} within the "
                   f"limit {t:.2f}{size}).",
                   f"If this is not '{label}', add examples of the right class; if it is none of your classes, lower "
                   f"the threshold (now {t:.2f}) so that such images are answered 'unknown'.")
