"""The ONNX form of a served decision: `decide` (`fewshot.decision.served`) as a graph from
embeddings (N, D) to

    scores (N, K) float32, probabilities (N, K) float32, novelty (N,) float64,
    label_index (N,) int64 (-1 = "unknown")

built from the same `ServedDecision` and `ClassMemory`: the same prototypes (float32 means), the
same head (ArgMin of squared distances / ArgMax of cosines or of the probe's logits: first index on
exact ties, as NumPy's argmax), the same class judged (the label's), and the novelty as the NumPy
form computes it: the base (d^2 or 1 - cos, float64) divided by the rule's per-class scale
(`OpenSetRule.scale`). Without an open-set rule the novelty is the base and every answer stands.
The operators keep their form from opset 12 on (row sums are products with a ones vector).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812
from onnx import TensorProto, helper, numpy_helper

from fewshot.decision.memory import ClassMemory
from fewshot.decision.served import ServedDecision

SCORES, PROBS, NOVELTY, LABEL_INDEX = "scores", "probabilities", "novelty", "label_index"
UNKNOWN_INDEX = -1


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _normalised(name: str, src: str) -> list[onnx.NodeProto]:
    """`F.normalize(x, dim=-1)` (eps 1e-12) of `src` (N, D) into `name`."""
    return [helper.make_node("Mul", [src, src], [f"{name}_sq"]),
            helper.make_node("MatMul", [f"{name}_sq", "head_ones"], [f"{name}_sum_sq"]),  # (N, 1)
            helper.make_node("Sqrt", [f"{name}_sum_sq"], [f"{name}_norm"]),
            helper.make_node("Max", [f"{name}_norm", "head_eps"], [f"{name}_den"]),
            helper.make_node("Div", [src, f"{name}_den"], [name])]


def _score_nodes(decision: ServedDecision, memory: ClassMemory, src: str) -> list[onnx.NodeProto]:
    """embeddings -> scores (N, K), as `ClassMemory.scores`."""
    if decision.metric == "cosine":
        unit = F.normalize(torch.from_numpy(memory.means), dim=-1).numpy()
        return [_const("head_protos_t", np.ascontiguousarray(unit.T)), *_normalised("head_q", src),
                helper.make_node("MatMul", ["head_q", "head_protos_t"], [SCORES])]
    return [_const("head_protos_t", np.ascontiguousarray(memory.means.T)), _const("head_proto_sq", memory.sq_norms),
            _const("head_two", np.asarray(2.0, np.float32)), _const("head_zero", np.asarray(0.0, np.float32)),
            helper.make_node("Mul", [src, src], ["head_q2"]),
            helper.make_node("MatMul", ["head_q2", "head_ones"], ["head_q_sq"]),
            helper.make_node("MatMul", [src, "head_protos_t"], ["head_cross"]),
            helper.make_node("Mul", ["head_cross", "head_two"], ["head_cross2"]),
            helper.make_node("Sub", ["head_q_sq", "head_cross2"], ["head_d0"]),
            helper.make_node("Add", ["head_d0", "head_proto_sq"], ["head_d1"]),
            helper.make_node("Max", ["head_d1", "head_zero"], [SCORES])]


def _uses_probe(decision: ServedDecision, memory: ClassMemory) -> bool:
    if decision.uses_probe and memory.n_classes > 1 and memory.probe is None:
        raise ValueError("a probe head needs the memory's fitted probe; build the memory with fit_memory")
    return decision.uses_probe and memory.probe is not None and memory.n_classes > 1


def _head_nodes(decision: ServedDecision, memory: ClassMemory, src: str) -> list[onnx.NodeProto]:
    """-> head_logits, probabilities (N, K) and head_label (N, 1): the head's class."""
    if _uses_probe(decision, memory):  # normalize(z) @ W.T + b
        assert memory.probe is not None
        probe = memory.probe
        return [_const("head_w_t", np.ascontiguousarray(probe.weight.numpy().T.astype(np.float32))),
                _const("head_b", probe.bias.numpy().astype(np.float32)), *_normalised("head_zn", src),
                helper.make_node("MatMul", ["head_zn", "head_w_t"], ["head_wz"]),
                helper.make_node("Add", ["head_wz", "head_b"], ["head_logits"]),
                helper.make_node("Softmax", ["head_logits"], [PROBS], axis=1),
                helper.make_node("ArgMax", ["head_logits"], ["head_label"], axis=1, keepdims=1)]
    if decision.metric == "cosine":
        logit = [_const("head_cos_scale", np.asarray(decision.rule.cosine_scale, np.float32)),
                 helper.make_node("Mul", [SCORES, "head_cos_scale"], ["head_logits"]),
                 helper.make_node("ArgMax", [SCORES], ["head_label"], axis=1, keepdims=1)]
    else:
        logit = [helper.make_node("Neg", [SCORES], ["head_logits"]),
                 helper.make_node("ArgMin", [SCORES], ["head_label"], axis=1, keepdims=1)]
    return [*logit, helper.make_node("Softmax", ["head_logits"], [PROBS], axis=1)]


def _centred_nodes(memory: ClassMemory, centre: np.ndarray, src: str) -> list[onnx.NodeProto]:
    """-> open_centred (N, K): cosines of src - c to the prototypes of the memory shifted by c
    (`fewshot.decision.served.judged_score`)."""
    unit = F.normalize(torch.from_numpy(memory.shifted(centre).means), dim=-1).numpy()
    return [_const("open_centre", np.asarray(centre, np.float32)), _const("open_protos_t", np.ascontiguousarray(unit.T)),
            helper.make_node("Sub", [src, "open_centre"], ["open_qc"]), *_normalised("open_qn", "open_qc"),
            helper.make_node("MatMul", ["open_qn", "open_protos_t"], ["open_centred"])]


def _judge_nodes(decision: ServedDecision, memory: ClassMemory, src: str) -> list[onnx.NodeProto]:
    """head_label -> novelty (N,) float64 of the label's class and label_index (N,) int64."""
    rule = decision.open_set
    counts, spreads = memory.judged(np.arange(memory.n_classes))
    scale = (np.ones(memory.n_classes) if rule is None
             else np.asarray(rule.scale(counts, spreads, memory.n_classes), np.float64))
    centre = None if rule is None else rule.centre_array
    judged = SCORES if centre is None else "open_centred"
    extra = [] if centre is None else _centred_nodes(memory, centre, src)
    base = [helper.make_node("Cast", ["head_score"], ["head_score64"], to=TensorProto.DOUBLE)]
    if decision.metric == "cosine":  # base 1 - cos (measured from the centre when the rule has one)
        base += [_const("head_one", np.asarray(1.0, np.float64)),
                 helper.make_node("Sub", ["head_one", "head_score64"], ["head_base"])]
    else:
        base += [helper.make_node("Identity", ["head_score64"], ["head_base"])]
    return [*extra, _const("head_scale", scale), _const("head_unknown", np.asarray(UNKNOWN_INDEX, np.int64)),
            _const("head_threshold", np.asarray(np.inf if rule is None else rule.threshold, np.float64)),
            helper.make_node("GatherElements", [judged, "head_label"], ["head_score_col"], axis=1),
            helper.make_node("Reshape", ["head_score_col", "head_flat"], ["head_score"]),
            helper.make_node("Reshape", ["head_label", "head_flat"], ["head_label_1d"]),
            *base,
            helper.make_node("Gather", ["head_scale", "head_label_1d"], ["head_label_scale"]),
            helper.make_node("Div", ["head_base", "head_label_scale"], [NOVELTY]),
            helper.make_node("LessOrEqual", [NOVELTY, "head_threshold"], ["head_known"]),
            helper.make_node("Where", ["head_known", "head_label_1d", "head_unknown"], [LABEL_INDEX])]


def decision_graph(decision: ServedDecision, memory: ClassMemory, dim: int, *, src: str = "embeddings") -> onnx.GraphProto:
    """The graph of `decide(decision, memory, .)`: input `src` (N, dim) float32 -> SCORES, PROBS,
    NOVELTY, LABEL_INDEX (module docstring)."""
    k = memory.n_classes
    if k == 0:
        raise ValueError("the decision needs at least one class; teach a class first")
    nodes = [_const("head_flat", np.asarray([-1], np.int64)), _const("head_ones", np.ones((dim, 1), np.float32)),
             _const("head_eps", np.asarray(1e-12, np.float32)), *_score_nodes(decision, memory, src),
             *_head_nodes(decision, memory, src), *_judge_nodes(decision, memory, src)]
    outputs = [helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["N", k]),
               helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["N", k]),
               helper.make_tensor_value_info(NOVELTY, TensorProto.DOUBLE, ["N"]),
               helper.make_tensor_value_info(LABEL_INDEX, TensorProto.INT64, ["N"])]
    return helper.make_graph(nodes, "decision", [helper.make_tensor_value_info(src, TensorProto.FLOAT, ["N", dim])],
                             outputs)
