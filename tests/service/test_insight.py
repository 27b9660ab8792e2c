"""The teach page's insight numbers: held-out accuracy, confusion, confused pairs, occlusion maps, on
tiny synthetic embeddings whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import ToyEmbedder, class_images

from fewshot.decision import DecisionRule, OpenSetRule, ServedDecision, softmax
from fewshot.decision.heldout import HeldOut, cross_validate, fold_ids, leave_one_out
from fewshot.errors import ConfigError
from fewshot.service.insight import (
    InsightCache,
    confused_pairs,
    occlusion_map,
    patch_bounds,
    recogniser_insight,
    served_logits,
    summarise,
    workspace_insight,
)
from fewshot.service.recogniser import Recogniser, WorkspaceSettings
from fewshot.service.store import Store

IDS = ("cls_a", "cls_b", "cls_c")


def served(metric: str, head: str = "prototype", open_set: OpenSetRule | None = None) -> ServedDecision:
    """The served decision of a workspace with this metric, head ("prototype" / "logistic") and rule."""
    return ServedDecision(DecisionRule("probe" if head == "logistic" else "prototype", metric), open_set)  # type: ignore[arg-type]

LABELS = ("apple", "pear", "plum")


def clusters(rng: np.random.Generator, sizes: list[int], dim: int = 8, sep: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Class k's examples scattered (sd 0.3) around sep * e_k: far apart, known answers."""
    y = np.repeat(np.arange(len(sizes)), sizes)
    centres = sep * np.eye(len(sizes), dim) + 1.0  # offset: cosine needs non-collinear directions too
    return (centres[y] + 0.3 * rng.standard_normal((len(y), dim))).astype(np.float32), y


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("head", ["prototype", "logistic"])
def test_separated_clusters_are_all_recognised(metric: str, head: str) -> None:
    x, y = clusters(np.random.default_rng(0), [5, 4, 6])
    ins = workspace_insight(7, IDS, LABELS, x, y, served(metric, head))  # type: ignore[arg-type]
    assert [c.accuracy for c in ins.classes] == [1.0, 1.0, 1.0]
    assert [c.evaluated for c in ins.classes] == [5, 4, 6]
    np.testing.assert_array_equal(ins.confusion, np.diag([5, 4, 6]))
    assert ins.pairs == () and ins.accuracy == 1.0 and ins.version == 7
    assert ins.method == ("leave-one-out" if head == "prototype" else "5-fold cross-validation")


@pytest.mark.parametrize("head", ["prototype", "logistic"])
def test_an_example_inside_another_cluster_is_a_confusion(head: str) -> None:
    rng = np.random.default_rng(1)
    x, y = clusters(rng, [6, 6, 6])
    x[2] = x[y == 1][:3].mean(0)  # apple's third example sits in pear's cluster
    ins = workspace_insight(1, IDS, LABELS, x, y, served("euclidean", head))  # type: ignore[arg-type]
    assert ins.confusion[0, 1] == 1 and ins.confusion[0, 0] == 5
    assert ins.confusion.sum() - np.trace(ins.confusion) == 1
    assert ins.classes[0].accuracy == pytest.approx(5 / 6) and ins.classes[1].accuracy == 1.0
    (pair,) = ins.pairs
    assert (pair.a, pair.b, pair.a_as_b, pair.b_as_a) == (0, 1, 1, 0)
    assert "'apple'" in pair.hint and "'pear'" in pair.hint and "1 'apple' example looked like 'pear'" in pair.hint


def test_a_one_example_class_is_not_measured_but_competes() -> None:
    x, y = clusters(np.random.default_rng(2), [5, 5, 1])
    x[0] = x[10] + 0.01  # apple's first example sits on plum's only example
    ins = workspace_insight(1, IDS, LABELS, x, y, served("euclidean"))
    plum = ins.classes[2]
    assert plum.accuracy is None and plum.evaluated == 0 and "teach at least 2" in (plum.note or "")
    assert ins.confusion[0, 2] == 1 and ins.confusion[2].sum() == 0
    assert ins.pairs[0].a == 0 and ins.pairs[0].b == 2


def test_one_class_and_no_class() -> None:
    x, y = clusters(np.random.default_rng(3), [4])
    one = workspace_insight(1, IDS[:1], LABELS[:1], x, y, served("euclidean"))
    assert one.classes[0].accuracy is None and "second class" in (one.classes[0].note or "") and one.pairs == ()
    none = workspace_insight(0, (), (), np.zeros((0, 8), np.float32), np.zeros(0, np.int64), served("euclidean"))
    assert none.classes == () and none.accuracy is None and "no classes yet" in none.notes[0]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_closed_form_leave_one_out_equals_refitting_without_each_example(metric: str) -> None:
    """The rank-one shortcut gives what rebuilding every prototype without the example gives, the
    open-set rule's leave-one-out count and spread included (overlapping classes: real confusions)."""
    rng = np.random.default_rng(4)
    x, y = clusters(rng, [1, 2, 3, 7, 5], dim=6, sep=1.0)
    spread = OpenSetRule("spread", metric, threshold=0.0, prior_spread=0.5, prior_strength=2.0)  # type: ignore[arg-type]
    fold = np.where(np.bincount(y)[y] >= 2, np.arange(len(y)), -1)
    probe = leave_one_out(x, y, 5, served(metric, open_set=spread))  # type: ignore[arg-type]
    nov = np.sort(probe.novelty[probe.evaluated])
    threshold = float(nov[len(nov) // 2 - 1: len(nov) // 2 + 1].mean())  # between two: half are accepted
    rule = served(metric, open_set=OpenSetRule("spread", metric, threshold, 0.5, 2.0))  # type: ignore[arg-type]
    fast, slow = leave_one_out(x, y, 5, rule), cross_validate(x, y, 5, rule, fold)
    np.testing.assert_array_equal(fast.predicted, slow.predicted)
    np.testing.assert_allclose(fast.novelty, slow.novelty, rtol=1e-4)
    np.testing.assert_array_equal(fast.accepted, slow.accepted)
    assert 0 < fast.accepted.sum() < fast.evaluated.sum() and (fast.predicted[fast.evaluated] != y[fast.evaluated]).any()


def test_rejected_counts_follow_the_open_set_threshold() -> None:
    x, y = clusters(np.random.default_rng(5), [4, 4])
    strict = workspace_insight(1, IDS[:2], LABELS[:2], x, y, served("euclidean", open_set=OpenSetRule("global", "euclidean", 1e-9)))
    loose = workspace_insight(1, IDS[:2], LABELS[:2], x, y, served("euclidean", open_set=OpenSetRule("global", "euclidean", 1e9)))
    assert [c.rejected for c in strict.classes] == [4, 4] and [c.rejected for c in loose.classes] == [0, 0]
    assert [c.accuracy for c in strict.classes] == [1.0, 1.0]  # forced-choice accuracy is unchanged


def test_fold_ids_keep_every_class_in_every_support() -> None:
    y = np.array([2, 0, 0, 1, 0, 0, 0, 0, 0, 2, 3, 2])
    fold = fold_ids(y, 4, folds=5)
    assert fold[3] == -1  # class 1 has one example
    for f in range(5):
        support = y[(fold != f)]
        assert set(support) == {0, 1, 2, 3}
    assert sorted(fold[y == 0].tolist()) == [0, 0, 1, 1, 2, 3, 4]


def test_confused_pairs_most_confused_first_and_bounded() -> None:
    c = np.array([[5, 2, 0, 1], [1, 4, 0, 0], [0, 0, 3, 0], [0, 0, 3, 2]])
    pairs = confused_pairs(c, ("a", "b", "c", "d"), max_pairs=2)
    # 3 confusions each: c/d (8 examples) before a/b (13); a/d (1) is cut
    assert [(p.a, p.b, p.a_as_b, p.b_as_a) for p in pairs] == [(2, 3, 0, 3), (0, 1, 2, 1)]
    assert "3 'd' examples looked like 'c'" in pairs[0].hint


def test_summarise_counts_only_held_out_examples() -> None:
    out = HeldOut(np.array([0, -1, 1, 1]), np.array([True, False, False, True]), np.full(4, np.nan))
    ins = summarise(3, IDS[:2], LABELS[:2], np.array([0, 0, 1, 1]), out, "leave-one-out")
    assert ins.evaluated == 3 and [c.evaluated for c in ins.classes] == [1, 2] and ins.classes[1].rejected == 1


def test_cache_recomputes_only_when_the_key_moves() -> None:
    x, y = clusters(np.random.default_rng(6), [3, 3])
    calls: list[int] = []

    def compute() -> object:
        calls.append(1)
        return workspace_insight(1, IDS[:2], LABELS[:2], x, y, served("euclidean"))

    cache = InsightCache(max_workspaces=2)
    first = cache.get("ws1", (1, "r"), compute)  # type: ignore[arg-type]
    assert cache.get("ws1", (1, "r"), compute) is first and len(calls) == 1  # type: ignore[arg-type]
    cache.get("ws1", (2, "r"), compute)  # type: ignore[arg-type]
    cache.get("ws2", (1, "r"), compute)  # type: ignore[arg-type]
    cache.get("ws3", (1, "r"), compute)  # type: ignore[arg-type]  # ws1 is the least recently used: dropped
    cache.get("ws1", (2, "r"), compute)  # type: ignore[arg-type]
    assert len(calls) == 5


# -- occlusion -------------------------------------------------------------------------------------------
def test_patch_bounds_cover_the_input() -> None:
    b = patch_bounds(224, 7)
    assert b[3] == (80, 144) and b[0] == (0, 48) and b[-1] == (176, 224)  # 64-px patches on 32-px cells
    assert patch_bounds(28, 7)[1] == (2, 10)
    covered = np.zeros(28, bool)
    for lo, hi in patch_bounds(28, 7):
        covered[lo:hi] = True
    assert covered.all()
    with pytest.raises(ConfigError, match="cells 20"):
        patch_bounds(28, 20)
    with pytest.raises(ConfigError, match="exceed the 4-pixel"):
        patch_bounds(4, 7)


def test_occlusion_finds_the_only_region_the_embedder_reads() -> None:
    """An embedder that sees only the top-left 8x8 pixels: patches away from them change nothing;
    patches over them (bright there, dark elsewhere) lower the answer's margin."""
    image = np.zeros((1, 28, 28), np.uint8)
    image[0, :8, :8] = 255
    calls: list[int] = []

    def embed(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch[:, 0, :8, :8].reshape(len(batch), -1).mean(1, keepdims=True) / 255.0

    protos = np.array([[1.0], [0.0]])  # class 0: a bright corner; class 1: a dark one
    m = occlusion_map(image, embed, lambda z: -((z[:, None, :] - protos[None]) ** 2).sum(-1), cells=7, batch=16)
    assert m.target == 0 and m.base_margin == pytest.approx(1.0) and m.drop.shape == (7, 7) and m.size == 28
    reads = np.zeros((7, 7), bool)
    reads[:3, :3] = True  # patch rows/cols [lo, hi) overlapping [0, 8): cells 0..2
    assert (m.drop[reads] > 0).all() and (m.drop[~reads] == 0).all()
    assert m.drop[0, 0] == m.drop.max()  # fully inside the corner
    assert calls == [1, 16, 16, 16, 1]  # the intact image, then 49 occluded copies in batches


def test_occlusion_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="uint8 image"):
        occlusion_map(np.zeros((28, 28), np.uint8), lambda b: b, lambda z: z)
    with pytest.raises(ConfigError, match="out of range"):
        occlusion_map(np.zeros((1, 28, 28), np.uint8), lambda b: np.zeros((len(b), 2)), lambda z: z, target=5)


# -- through a recogniser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["prototype", "logistic"])
def test_served_logits_are_what_classify_serves(sqlite_store: Store, head: str) -> None:
    r = Recogniser(ToyEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w", WorkspaceSettings(metric="cosine", head=head))  # type: ignore[arg-type]
    for c in range(3):
        r.add_class(ws.id, f"c{c}", class_images(c, 4))
    q = class_images(1, 6)[4:]
    state = r.decision_state(ws.id)
    probs = softmax(served_logits(state)(r.embedder.embed(q)))
    for p, row in zip(r.classify(ws.id, q, top_k=3), probs):
        got = {c.class_id: c.probability for c in p.top_k}
        np.testing.assert_allclose([got[c] for c in state.protos.class_ids], row, rtol=1e-5, atol=1e-7)


def test_recogniser_insight_is_cached_per_version(sqlite_store: Store) -> None:
    r = Recogniser(ToyEmbedder(), sqlite_store)
    ws, _ = r.create_workspace("w")
    ids = [r.add_class(ws.id, f"c{c}", class_images(c, 3)).id for c in range(3)]
    cache = InsightCache()
    first = recogniser_insight(r, ws.id, cache)
    assert first.class_ids == tuple(ids) and [c.evaluated for c in first.classes] == [3, 3, 3]
    assert [c.accuracy for c in first.classes] == [1.0, 1.0, 1.0]
    assert recogniser_insight(r, ws.id, cache) is first
    r.add_images(ws.id, ids[1], class_images(1, 5)[3:])
    second = recogniser_insight(r, ws.id, cache)
    assert second.version > first.version and [c.n_examples for c in second.classes] == [3, 5, 3]
    r.patch_settings(ws.id, {"metric": "cosine"})
    assert recogniser_insight(r, ws.id, cache) is not second  # the rule moved
