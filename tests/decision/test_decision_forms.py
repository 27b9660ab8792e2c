"""The served decision's NumPy form (`decide`) and ONNX form (`decision_graph`) give the same
answers, on random data and on exact ties; the answered class is the judged class."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from fewshot.decision import (
    ClassMemory,
    DecisionRule,
    LeaveOneOut,
    OpenSetRule,
    Probe,
    ServedDecision,
    decide,
    fit_memory,
)
from fewshot.decision.onnx_form import decision_graph

CASES = [(m, h, k) for m in ("euclidean", "cosine") for h in ("prototype", "probe")
         for k in (None, "global", "spread", "shape")] + [("cosine", h, "shape-centred") for h in ("prototype", "probe")]


def decision(metric: str, head: str, kind: str | None, threshold: float = 1.0) -> ServedDecision:
    """kind "shape-centred": the "shape" rule with a centre (0.5, -0.25, 0.5, ...) of the test's dimension."""
    rule = DecisionRule(head, metric, cosine_scale=3.5, probe_c=0.5, probe_max_iter=30)  # type: ignore[arg-type]
    if kind is None:
        return ServedDecision(rule)
    extra: dict[str, object] = {}
    if kind.startswith("shape"):
        extra["coefficients"] = (0.1, -0.2, 0.3, -0.05)
    if kind == "shape-centred":
        extra["centre"] = tuple([0.5, -0.25] * 4)
    open_set = OpenSetRule(kind.removesuffix("-centred"), metric, threshold, prior_spread=2.0,  # type: ignore[arg-type]
                           prior_strength=3.0, shot_penalty=0.5, **extra)  # type: ignore[arg-type]
    return ServedDecision(rule, open_set)


def run_onnx(d: ServedDecision, memory: ClassMemory, q: np.ndarray) -> list[np.ndarray]:
    graph = decision_graph(d, memory, q.shape[1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"embeddings": q})  # type: ignore[no-any-return]


def threshold_between(novelty: np.ndarray) -> float:
    """A threshold half-way between two middle novelties: no answer sits on it."""
    s = np.sort(novelty)
    return float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)


def assert_same(d: ServedDecision, memory: ClassMemory, q: np.ndarray) -> None:
    a = decide(d, memory, q)
    scores, probs, novelty, index = run_onnx(d, memory, q)
    np.testing.assert_allclose(scores, a.scores, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(probs, a.probabilities, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.where(a.known, a.label, -1), index)
    if a.novelty is not None:
        np.testing.assert_allclose(novelty, a.novelty, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric,head,kind", CASES)
def test_numpy_and_onnx_forms_agree_on_random_data(metric: str, head: str, kind: str | None) -> None:
    rng = np.random.default_rng(0)
    k, dim = 6, 8
    y = np.repeat(np.arange(k), [1, 2, 3, 4, 5, 2])
    x = (rng.standard_normal((k, dim)) * 2)[y] + rng.standard_normal((len(y), dim)).astype(np.float32)
    q = rng.standard_normal((40, dim)).astype(np.float32) * 2
    d = decision(metric, head, kind)
    memory = fit_memory(d, x.astype(np.float32), y, k)
    if kind is not None:  # a threshold that accepts some answers and rejects others
        d = decision(metric, head, kind, threshold_between(decide(d, memory, q).novelty))  # type: ignore[arg-type]
        assert 0 < decide(d, memory, q).known.sum() < len(q)
    assert_same(d, memory, q)


@pytest.mark.parametrize("metric,head,kind", CASES)
def test_numpy_and_onnx_forms_agree_on_exact_ties(metric: str, head: str, kind: str | None) -> None:
    """Classes 1 and 3 have the same examples (and probe weights): every query ties them exactly;
    values are halves and integers, so every product and sum is exact in float32."""
    units = np.asarray([[1, 1, 1, 1], [1, -1, 1, -1], [-1, -1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1]], np.float32)
    x = np.concatenate([units, units]) * np.asarray([[2.0]] * 5 + [[2.0]] * 5, np.float32)
    y = np.tile(np.arange(5), 2)
    memory = ClassMemory.of(x, y, 5)
    if head == "probe":
        w = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
        memory = ClassMemory(memory.sums, memory.sq_sums, memory.counts, Probe(w, torch.zeros(5)))
    q = np.asarray([[2, -2, 2, -2], [1, -1, 1, -1], [2, 0, 0, 0], [0, 0, 0, 2]], np.float32)
    if kind == "shape-centred":  # the centre's dimension is the data's
        kind = "shape"
    d = decision(metric, head, kind, threshold=0.5)
    a = decide(d, memory, q)
    assert a.label[0] == 1 and a.preference[0, 1] == a.preference[0, 3]  # a tie, answered by the first class
    assert_same(d, memory, q)


def test_the_probe_class_is_the_judged_class() -> None:
    """The probe answers class 0 (the direction of its examples) while the nearest prototype is
    class 1: the score, novelty and "known" are those of class 0."""
    x = np.asarray([[200, 0, 0, 0], [200, 10, 0, 0], [10, 10, 0, 0], [12, 8, 0, 0]], np.float32)
    y = np.asarray([0, 0, 1, 1])
    q = np.asarray([[20, 0, 0, 0]], np.float32)
    d = ServedDecision(DecisionRule("probe", "euclidean"), OpenSetRule("global", "euclidean", 1000.0))
    a = decide(d, fit_memory(d, x, y, 2), q)
    assert a.label[0] == 0 and a.scores[0].argmin() == 1
    assert a.score[0] == a.scores[0, 0] == pytest.approx(180.0**2 + 25.0)
    assert a.novelty is not None and a.novelty[0] == a.score[0] and not a.known[0]


def test_a_probe_head_with_one_class_is_answered_by_the_prototype() -> None:
    d = ServedDecision(DecisionRule("probe", "cosine"))
    x = np.ones((3, 4), np.float32)
    a = decide(d, fit_memory(d, x, np.zeros(3, np.int64), 1), x)
    assert a.label.tolist() == [0, 0, 0] and np.allclose(a.probabilities, 1.0)
    with pytest.raises(ValueError, match="fit_memory"):
        decide(d, ClassMemory.of(np.concatenate([x, -x]), np.repeat([0, 1], 3), 2), x)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_leave_one_out_memory_equals_rebuilding_without_the_example(metric: str) -> None:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), [3, 4, 2])
    x = (rng.standard_normal((len(y), 5)) + 3 * np.eye(3, 5)[y]).astype(np.float32)
    d = ServedDecision(DecisionRule("prototype", metric), OpenSetRule("spread", metric, 1.0))  # type: ignore[arg-type]
    loo = decide(d, LeaveOneOut.of(x, y, 3), x)
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        alone = decide(d, ClassMemory.of(x[keep], y[keep], 3), x[i:i + 1])
        assert loo.label[i] == alone.label[0]
        np.testing.assert_allclose(loo.scores[i], alone.scores[0], rtol=1e-5, atol=1e-5)
        assert loo.novelty is not None and alone.novelty is not None
        assert loo.novelty[i] == pytest.approx(alone.novelty[0], rel=1e-5)
