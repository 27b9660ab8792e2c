"""What a workspace's model knows: the numbers behind the teach page's "under the hood" panel.

Every number comes from the workspace's served decision (`fewshot.decision.decide`, as
`Recogniser.classify` applies it) on the embeddings it stores:

* Held-out accuracy per class. Each stored example is answered with itself removed from the class
  memory the decision reads. For the nearest-prototype head this is exact leave-one-out in closed
  form (`fewshot.decision.LeaveOneOut`: one (N, K) score matrix plus O(N D) corrections). The probe
  ("logistic" head) has no closed form: it is refitted per fold of a k-fold split (`fold_ids`).
  The open-set rule judges the answered class with its count and spread as the held-out example
  sees them, so `rejected` counts the held-out examples the service would answer "unknown".
  A class with one example cannot be held out (it would have no prototype): it is reported as
  not measured, and still competes for the other classes' examples.
* A confusion matrix over the taught classes (rows: true class, columns: forced-choice answer) and
  the most confused pairs with a hint.
* Occlusion maps (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV
  2014): a patch filled with the image's mean value slides over the model input; each occluded
  copy is embedded by the served embedder in batches, and the map holds how much the answer's
  margin over the runner-up class drops per patch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from itertools import compress
from threading import Lock

import numpy as np

from fewshot.decision import ServedDecision, decide
from fewshot.decision.heldout import (
    PROBE_FOLDS,
    HeldOut,
    held_out,
    method,
)
from fewshot.errors import ConfigError
from fewshot.service.memory import Prototypes
from fewshot.service.recogniser import DecisionState, Recogniser
from fewshot.service.store import ConflictError

Embed = Callable[[np.ndarray], np.ndarray]  # uint8 images (N, C, S, S) -> embeddings (N, D)
Logits = Callable[[np.ndarray], np.ndarray]  # embeddings (N, D) -> served logits (N, K)


# -- the panel's summary -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassReport:
    """One taught class: `evaluated` held-out examples, `correct` forced-choice answers among them,
    `rejected` ones the open-set rule would answer "unknown"; `accuracy` None with `note` saying why."""

    class_id: str
    label: str
    n_examples: int
    evaluated: int
    correct: int
    rejected: int
    accuracy: float | None
    note: str | None = None


@dataclass(frozen=True)
class ConfusedPair:
    """Two classes whose held-out examples were answered as each other (`a_as_b` + `b_as_a` > 0)."""

    a: int
    b: int
    a_as_b: int
    b_as_a: int
    hint: str


@dataclass(frozen=True)
class Insight:
    """What a workspace's model knows at one version: per-class held-out accuracy, the confusion
    matrix (K, K) int (rows: true class, columns: forced-choice answer) and the most confused pairs."""

    version: int
    method: str
    class_ids: tuple[str, ...]
    labels: tuple[str, ...]
    classes: tuple[ClassReport, ...]
    confusion: np.ndarray
    pairs: tuple[ConfusedPair, ...]
    notes: tuple[str, ...]

    @property
    def evaluated(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float | None:
        """Held-out accuracy over all classes; None before anything is measured or with one class
        (a forced choice among one class is always right, as the class's own report says)."""
        n = self.evaluated
        return float(np.trace(self.confusion)) / n if n and len(self.class_ids) > 1 else None


def _class_report(i: int, class_id: str, label: str, n: int, y: np.ndarray, out: HeldOut, n_classes: int) -> ClassReport:
    mine = (y == i) & out.evaluated
    evaluated, correct = int(mine.sum()), int((out.predicted[mine] == i).sum())
    rejected = int((~out.accepted[mine]).sum())
    if n_classes < 2:
        return ClassReport(class_id, label, n, evaluated, correct, rejected, None,
                           "teach a second class: accuracy compares classes")
    if n < 2:
        return ClassReport(class_id, label, n, 0, 0, 0, None,
                           f"{n} example: teach at least 2 to measure how well it is recognised")
    return ClassReport(class_id, label, n, evaluated, correct, rejected, correct / evaluated)


def confused_pairs(confusion: np.ndarray, labels: tuple[str, ...], max_pairs: int = 5) -> tuple[ConfusedPair, ...]:
    """Pairs with at least one confusion, most confused first (ties: the smaller classes first)."""
    both = confusion + confusion.T
    a, b = np.nonzero(np.triu(both, 1))
    sizes = confusion.sum(1)
    order = sorted(range(len(a)), key=lambda j: (-both[a[j], b[j]], sizes[a[j]] + sizes[b[j]], a[j], b[j]))
    pairs = []
    for j in order[:max_pairs]:
        i, k = int(a[j]), int(b[j])
        ab, ba = int(confusion[i, k]), int(confusion[k, i])
        pairs.append(ConfusedPair(i, k, ab, ba, _pair_hint(labels[i], labels[k], ab, ba)))
    return tuple(pairs)


def _pair_hint(a: str, b: str, ab: int, ba: int) -> str:
    seen = "; ".join(f"{n} {x!r} example{'s' if n != 1 else ''} looked like {z!r}"
                     for n, x, z in ((ab, a, b), (ba, b, a)) if n)
    return f"{seen}. Add more examples of {a!r} and {b!r}, with images that show how they differ."


def summarise(version: int, class_ids: tuple[str, ...], labels: tuple[str, ...], y: np.ndarray,
              out: HeldOut, method: str, max_pairs: int = 5) -> Insight:
    """The panel's numbers from held-out answers `out` of examples with classes `y` (N,)."""
    k = len(class_ids)
    counts = np.bincount(y, minlength=k)
    confusion = np.zeros((k, k), np.int64)
    ev = out.evaluated
    np.add.at(confusion, (y[ev], out.predicted[ev]), 1)
    reports = tuple(_class_report(i, class_ids[i], labels[i], int(counts[i]), y, out, k) for i in range(k))
    notes = []
    if k == 0:
        notes.append("no classes yet: teach one with a few images")
    elif not ev.any():
        notes.append("no class has 2 examples yet: teach more images to measure the model")
    return Insight(version, method, class_ids, labels, reports, confusion,
                   confused_pairs(confusion, labels, max_pairs) if k > 1 else (), tuple(notes))


def workspace_insight(version: int, class_ids: tuple[str, ...], labels: tuple[str, ...], x: np.ndarray,
                      y: np.ndarray, decision: ServedDecision, probe_folds: int = PROBE_FOLDS) -> Insight:
    """Held-out answers of the served `decision` on embeddings x (N, D) with class indices y (N,),
    summarised for the panel."""
    k = len(class_ids)
    empty = HeldOut(np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0))
    out = held_out(x, y, k, decision, probe_folds) if len(y) else empty
    return summarise(version, class_ids, labels, y, out, method(decision, probe_folds))


class InsightCache:
    """Insights by workspace, valid while their key (version, rule) holds; at most `max_workspaces`,
    least recently used dropped first. Thread-safe; two requests may compute the same entry."""

    def __init__(self, max_workspaces: int = 256) -> None:
        self.max_workspaces = max_workspaces
        self._entries: OrderedDict[str, tuple[Hashable, Insight]] = OrderedDict()
        self._lock = Lock()

    def get(self, workspace_id: str, key: Hashable, compute: Callable[[], Insight]) -> Insight:
        with self._lock:
            hit = self._entries.get(workspace_id)
            if hit is not None and hit[0] == key:
                self._entries.move_to_end(workspace_id)
                return hit[1]
        insight = compute()
        with self._lock:
            self._entries[workspace_id] = (key, insight)
            self._entries.move_to_end(workspace_id)
            while len(self._entries) > self.max_workspaces:
                self._entries.popitem(last=False)
        return insight

    def forget(self, workspace_id: str) -> None:
        with self._lock:
            self._entries.pop(workspace_id, None)


# -- occlusion ---------------------------------------------------------------------------------------
MIN_CELLS, MAX_CELLS = 2, 14


def patch_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """[lo, hi) pixel bounds along one axis of `cells` patches over a side of `size` pixels: each
    patch is centred on its cell (size / cells wide) and twice as wide, clipped at the border."""
    if not MIN_CELLS <= cells <= MAX_CELLS:
        raise ConfigError(f"occlusion cells {cells} must be in {MIN_CELLS}..{MAX_CELLS} (the map is cells x cells)")
    if size < cells:
        raise ConfigError(f"occlusion cells {cells} exceed the {size}-pixel model input; use at most {size}")
    step = size / cells
    return [(max(0, round((c + 0.5) * step - step)), min(size, round((c + 0.5) * step + step))) for c in range(cells)]


def occluded(image: np.ndarray, cells: int) -> np.ndarray:
    """uint8 (cells * cells, C, S, S): `image` (C, S, S) with one patch filled by its per-channel
    mean each, row-major over the grid."""
    c, s, _ = image.shape
    fill = np.round(image.reshape(c, -1).mean(1)).astype(np.uint8)[:, None, None]
    bounds = patch_bounds(s, cells)
    out = np.repeat(image[None], cells * cells, axis=0)
    for r, (y0, y1) in enumerate(bounds):
        for q, (x0, x1) in enumerate(bounds):
            out[r * cells + q, :, y0:y1, x0:x1] = fill
    return out


def margins(logits: np.ndarray, target: int) -> np.ndarray:
    """(N, K) logits -> (N,) the target's logit minus the best other class's (its logit when K = 1)."""
    if logits.shape[1] == 1:
        return logits[:, target].astype(np.float64)
    others = np.delete(logits, target, axis=1)
    return (logits[:, target] - others.max(1)).astype(np.float64)


@dataclass(frozen=True)
class OcclusionMap:
    """drop (cells, cells): the target's margin on the intact image minus its margin with that patch
    occluded; > 0: the patch supported the answer. `patch`: pixels per side of a patch."""

    target: int
    base_margin: float
    drop: np.ndarray
    patch: int
    size: int


def occlusion_map(image: np.ndarray, embed: Embed, logits: Logits, *, target: int | None = None,
                  cells: int = 7, batch: int = 32) -> OcclusionMap:
    """Occlusion map of one model input `image` uint8 (C, S, S) for class `target` (default: the
    served answer), embedding `batch` images per call (1 + cells^2 images in all)."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ConfigError(f"occlusion needs one uint8 image (C, S, S); got {image.dtype} {image.shape}")
    base = logits(embed(image[None]))
    t = int(base[0].argmax()) if target is None else target
    if not 0 <= t < base.shape[1]:
        raise ConfigError(f"target class {t} is out of range for {base.shape[1]} classes")
    copies = occluded(image, cells)
    m = np.concatenate([margins(logits(embed(copies[i:i + batch])), t) for i in range(0, len(copies), batch)])
    lo, hi = patch_bounds(image.shape[1], cells)[cells // 2]
    base_margin = float(margins(base, t)[0])
    return OcclusionMap(t, base_margin, (base_margin - m).reshape(cells, cells), hi - lo, image.shape[1])


# -- a recogniser's workspace ------------------------------------------------------------------------
def served_logits(state: DecisionState) -> Logits:
    """Embeddings (N, D) -> (N, K) logits of the workspace's served decision, over the classes of
    `state.protos`."""
    return lambda q: decide(state.decision, state.memory, q).logits


MAX_INSIGHT_CLASSES = 1000  # the confusion matrix is (K, K), sent as JSON
MAX_INSIGHT_SCORES = 10_000_000  # held-out answers score every stored example against every class: (N, K) float64


def check_insight_size(n_examples: int, n_classes: int, *, max_classes: int = MAX_INSIGHT_CLASSES,
                       max_scores: int = MAX_INSIGHT_SCORES, what: str = "insight") -> None:
    """Refuse (409) a workspace whose insight (or `what`) would take memory quadratic in its size."""
    if n_classes > max_classes or n_examples * n_classes > max_scores:
        raise ConflictError(f"{what} is limited to {max_classes} classes and {max_scores:,} example x class scores; "
                            f"this workspace has {n_classes} classes and {n_examples} examples "
                            f"({n_examples * n_classes:,} scores): split it into smaller workspaces")


def recogniser_insight(recogniser: Recogniser, workspace_id: str, cache: InsightCache, *,
                       max_classes: int = MAX_INSIGHT_CLASSES, max_scores: int = MAX_INSIGHT_SCORES) -> Insight:
    """The workspace's insight, computed from its stored embeddings when its version or rule moved
    (`check_insight_size` first)."""
    state = recogniser.decision_state(workspace_id)
    p, decision = state.protos, state.decision
    check_insight_size(int(p.counts.sum()), len(p.class_ids), max_classes=max_classes, max_scores=max_scores)

    def compute() -> Insight:
        x, y = stored_embeddings(recogniser, workspace_id, p)
        return workspace_insight(p.version, p.class_ids, p.labels, x, y, decision)

    return cache.get(workspace_id, (p.version, decision), compute)


def stored_embeddings(recogniser: Recogniser, workspace_id: str, p: Prototypes) -> tuple[np.ndarray, np.ndarray]:
    """The workspace's stored embeddings (N, D) of the classes of `p` and their class indices (N,)
    in `p`'s order (an example of a class deleted since `p` is left out)."""
    ex = recogniser.stored_examples(workspace_id)
    keep = np.fromiter((c in p.index for c in ex.class_ids), bool, len(ex.class_ids))
    y = np.fromiter((p.index[c] for c in compress(ex.class_ids, keep)), np.int64, int(keep.sum()))
    return ex.embeddings[keep], y


def recogniser_occlusion(recogniser: Recogniser, workspace_id: str, image: np.ndarray, class_id: str,
                         cells: int = 7) -> OcclusionMap:
    """Occlusion map of model input `image` (C, S, S) for the workspace's class `class_id`, through
    the recogniser's embedder and served head."""
    state = recogniser.decision_state(workspace_id)
    if class_id not in state.protos.index:
        raise ConflictError(f"class {class_id!r} was deleted while the image was explained; classify it again")
    return occlusion_map(image, recogniser.embed, served_logits(state),
                         target=state.protos.index[class_id], cells=cells)
