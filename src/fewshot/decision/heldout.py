"""Held-out answers of a served decision on its own stored examples, and the choice of a head
by them ("a workspace that learns from use").

* `leave_one_out`: exact leave-one-out of the nearest-prototype head, in closed form (`LeaveOneOut`).
* `cross_validate` over `fold_ids`: the memory (and the probe, for a probe head) rebuilt per fold of a
  k-fold split in which every class keeps an example in every fold's memory.
* `choose_head`: each candidate decision answers the same held-out folds; an example counts as
  right when the answer is its class *and* the open-set rule accepts it, as a user would be told.
  A candidate other than the first (the plain prototypes) is chosen only when it answers strictly
  more examples right; too few held-out examples choose nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fewshot.decision.memory import LeaveOneOut
from fewshot.decision.served import Head, ServedDecision, decide, fit_memory
from fewshot.errors import ConfigError

PROBE_FOLDS = 5  # folds of the k-fold split that measures the probe ("logistic" head)


def method(decision: ServedDecision, probe_folds: int = PROBE_FOLDS) -> str:
    return f"{probe_folds}-fold cross-validation" if decision.uses_probe else "leave-one-out"


@dataclass(frozen=True)
class HeldOut:
    """Answers for held-out examples, (N,) each: `predicted` forced-choice class index (-1: the
    example was not held out), `accepted` by the open-set rule, `novelty` (nan without a rule)."""

    predicted: np.ndarray
    accepted: np.ndarray
    novelty: np.ndarray

    @property
    def evaluated(self) -> np.ndarray:
        return self.predicted >= 0


# -- held-out answers ------------------------------------------------------------------------------
def leave_one_out(x: np.ndarray, y: np.ndarray, n_classes: int, decision: ServedDecision) -> HeldOut:
    """Exact leave-one-out answers of the nearest-prototype head (`LeaveOneOut`). x: (N, D)
    embeddings, y: (N,) class indices in 0..n_classes-1. Examples of one-example classes are not
    held out (predicted -1)."""
    memory = LeaveOneOut.of(x, y, n_classes)
    a = decide(decision, memory, memory.x)
    held = memory.held
    novelty = np.full(len(y), np.nan) if a.novelty is None else a.novelty
    return HeldOut(np.where(held, a.label, -1), a.known & held, np.where(held, novelty, np.nan))


def answers(xs: np.ndarray, ys: np.ndarray, n_classes: int, xq: np.ndarray,
            decision: ServedDecision) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The served decision over the memory of support (xs (S, D), ys (S,)) answering queries
    xq (Q, D): answered class (Q,), accepted by the open-set rule (Q,), novelty (Q,)."""
    a = decide(decision, fit_memory(decision, np.asarray(xs, np.float32), ys, n_classes), xq)
    return a.label, a.known, np.full(len(xq), np.nan) if a.novelty is None else a.novelty


def fold_ids(y: np.ndarray, n_classes: int, folds: int) -> np.ndarray:
    """(N,) fold of each example: the j-th example of a class goes to fold j % folds, so every class
    keeps >= 1 example in every fold's support; one-example classes are never held out (-1)."""
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y, minlength=n_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(y), np.int64)
    rank[order] = np.arange(len(y)) - starts[y[order]]
    k = max(2, min(folds, int(counts.max(initial=0))))
    return np.where(counts[y] >= 2, rank % k, -1)


def cross_validate(x: np.ndarray, y: np.ndarray, n_classes: int, decision: ServedDecision,
                   fold: np.ndarray) -> HeldOut:
    """Held-out answers with the memory rebuilt for each fold (`fold`: (N,) fold id, -1: never held out)."""
    predicted = np.full(len(y), -1, np.int64)
    accepted = np.zeros(len(y), bool)
    novelty = np.full(len(y), np.nan)
    for f in np.unique(fold[fold >= 0]):
        q = fold == f
        predicted[q], accepted[q], novelty[q] = answers(x[~q], y[~q], n_classes, x[q], decision)
    return HeldOut(predicted, accepted, novelty)


def held_out(x: np.ndarray, y: np.ndarray, n_classes: int, decision: ServedDecision,
             probe_folds: int = PROBE_FOLDS) -> HeldOut:
    """Leave-one-out for the prototype head (closed form), k-fold for the probe."""
    if not decision.uses_probe:
        return leave_one_out(x, y, n_classes, decision)
    if probe_folds < 2:
        raise ConfigError(f"probe_folds {probe_folds} must be >= 2")
    return cross_validate(x, y, n_classes, decision, fold_ids(y, n_classes, probe_folds))


# -- choosing a head by held-out answers -----------------------------------------------------------
MIN_HELD_OUT = 10  # held-out examples below which a comparison of heads says nothing


@dataclass(frozen=True)
class HeadScore:
    """One candidate head on the held-out examples: `evaluated` held out, `correct` answered with
    their class (forced choice), `right` answered with their class and accepted (what is served)."""

    head: Head
    evaluated: int
    correct: int
    right: int

    @property
    def accuracy(self) -> float | None:
        """Share of held-out examples answered right as served (None: none held out)."""
        return self.right / self.evaluated if self.evaluated else None

    def to_dict(self) -> dict[str, object]:
        return {"head": self.head, "evaluated": self.evaluated, "correct": self.correct, "right": self.right,
                "accuracy": self.accuracy}


@dataclass(frozen=True)
class HeadChoice:
    """`scores` of every candidate (the default first) on `folds` folds and the `chosen` head (None:
    fewer than `min_held_out` held-out examples, too few to compare)."""

    scores: tuple[HeadScore, ...]
    chosen: Head | None
    folds: int
    min_held_out: int

    def why(self, name: Callable[[Head], str] = str) -> str:
        """The choice in words, each head called `name(head)`."""
        held = self.scores[0].evaluated
        if self.chosen is None:
            return (f"{held} examples can be held out (classes with 2 or more examples, 2 or more classes); at least "
                    f"{self.min_held_out} are needed to compare heads: teach more images")
        words = ", ".join(f"{name(s.head)} {s.right} of {s.evaluated}" for s in self.scores)
        first = self.scores[0].head
        verdict = (f"no head beats {name(first)}, so it stays" if self.chosen == first
                   else f"{name(self.chosen)} answers more of them right")
        return f"held-out examples answered right ({self.folds}-fold cross-validation): {words}; {verdict}"


def head_score(decision: ServedDecision, y: np.ndarray, out: HeldOut) -> HeadScore:
    ev = out.evaluated
    hit = ev & (out.predicted == y)
    return HeadScore(decision.rule.rule, int(ev.sum()), int(hit.sum()), int((hit & out.accepted).sum()))


def choose_head(candidates: Sequence[ServedDecision], x: np.ndarray, y: np.ndarray, n_classes: int, *,
                folds: int = PROBE_FOLDS, min_held_out: int = MIN_HELD_OUT) -> HeadChoice:
    """Score each candidate decision (the default, usually the nearest prototype, first) on the same
    `folds`-fold split of embeddings x (N, D) with classes y (N,); choose another candidate only when
    it answers strictly more held-out examples right than every candidate before it."""
    if not candidates:
        raise ConfigError("choose_head needs at least one candidate decision")
    if folds < 2:
        raise ConfigError(f"folds {folds} must be >= 2")
    fold = fold_ids(y, n_classes, folds) if len(y) else np.zeros(0, np.int64)
    scores = tuple(head_score(d, y, cross_validate(x, y, n_classes, d, fold)) for d in candidates)
    k = int(fold.max(initial=-1)) + 1
    if n_classes < 2 or scores[0].evaluated < min_held_out:
        return HeadChoice(scores, None, k, min_held_out)
    best = scores[0]
    for s in scores[1:]:
        if s.right > best.right:
            best = s
    return HeadChoice(scores, best.head, k, min_held_out)
