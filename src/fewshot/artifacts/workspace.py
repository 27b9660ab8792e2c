"""A taught workspace as one standalone ONNX classifier plus a labels file.

The classifier is the bundle's ONNX embedder composed (`onnx.compose.merge_models`) with a small
preprocessing graph in front and the ONNX form of the workspace's served decision behind
(`fewshot.decision.onnx_form`, built from the same `ServedDecision` and class memory that the
service's recogniser passes to `fewshot.decision.decide`):

    pixels uint8 (N, C, S, S) -> x / 255 [-> (x - mean) / std] -> embedder -> embeddings (N, D)
    scores (N, K)         squared distances ("euclidean") or cosine similarities to the K prototypes
    probabilities (N, K)  softmax of the head's logits (prototype: -d^2 or scale * cos; logistic: the fitted probe)
    novelty (N,)          float64, the open-set rule's novelty of the answered class
    label_index (N,)      int64, index into labels.json's `labels`; -1 = "unknown" (novelty > threshold)

It runs on ONNX Runtime alone. The embedder is the model the service runs (`Bundle.onnx_path`:
`model.int8.onnx` in an int8 bundle), its names prefixed with `embedder/` so that no name of a
bring-your-own model collides with the graphs around it. The added graphs use only operators whose
form is the same from opset 12 on, so a bundle whose model is of opset 12 or newer exports.

It takes plain data (the bundle, the served decision, the class memory and the labels of its
rows); the service gathers them from a workspace (`fewshot.service.standalone`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from fewshot.artifacts.bundle import Bundle
from fewshot.artifacts.embedders import ONNX_INPUT, ONNX_OUTPUT
from fewshot.data.imageio import Preprocessing
from fewshot.decision import ClassMemory, ServedDecision
from fewshot.decision.onnx_form import (
    LABEL_INDEX,
    NOVELTY,
    PROBS,
    SCORES,
    UNKNOWN_INDEX,
    decision_graph,
)
from fewshot.errors import ConfigError

FORMAT = "fewshot-standalone-1"
PIXELS = "pixels"
MODEL_FILE, LABELS_FILE = "model.onnx", "labels.json"
EMBEDDER_PREFIX = "embedder/"
MIN_OPSET = 12  # LessOrEqual; the other added operators keep their form from opset 11 on


@dataclass(frozen=True)
class Standalone:
    """The exported classifier: the ONNX model and the labels file's contents."""
    model: onnx.ModelProto
    labels: dict[str, Any]

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        onnx.save_model(self.model, str(out / MODEL_FILE))
        (out / LABELS_FILE).write_text(json.dumps(self.labels, indent=2, ensure_ascii=False))
        return out

    def zip_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(MODEL_FILE, self.model.SerializeToString())
            z.writestr(LABELS_FILE, json.dumps(self.labels, indent=2, ensure_ascii=False))
        return buf.getvalue()


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def _like(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    """`graph` as a model with the bundle model's IR version and opsets (merge_models needs them equal)."""
    return helper.make_model(graph, ir_version=model.ir_version, opset_imports=list(model.opset_import))


def _input_graph(pre: Preprocessing) -> onnx.GraphProto:
    """uint8 pixels -> the embedder's float input, as `fewshot.data.imageio.model_input` computes it."""
    nodes = [_const("pre_scale", np.asarray(1.0 / 255.0, np.float32)),
             helper.make_node("Cast", [PIXELS], ["pre_float"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["pre_float", "pre_scale"], ["pre_x" if pre.mean is not None else ONNX_INPUT])]
    if pre.mean is not None and pre.std is not None:
        per_channel = (1, pre.channels, 1, 1)
        nodes += [_const("pre_mean", np.asarray(pre.mean, np.float32).reshape(per_channel)),
                  _const("pre_std", np.asarray(pre.std, np.float32).reshape(per_channel)),
                  helper.make_node("Sub", ["pre_x", "pre_mean"], ["pre_centred"]),
                  helper.make_node("Div", ["pre_centred", "pre_std"], [ONNX_INPUT])]
    shape: list[str | int] = ["N", pre.channels, pre.size, pre.size]
    return helper.make_graph(nodes, "preprocess", [helper.make_tensor_value_info(PIXELS, TensorProto.UINT8, shape)],
                             [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, shape)])


@dataclass(frozen=True)
class TaughtClasses:
    """What a workspace was taught, as the decision reads it: the class memory and, per row, the
    class's label and id; `version` and `workspace_id` say which state of which workspace."""

    memory: ClassMemory
    labels: Sequence[str]
    class_ids: Sequence[str]
    workspace_id: str
    version: int


def _labels_file(taught: TaughtClasses, decision: ServedDecision, bundle: Bundle, *, model_name: str,
                 head: str) -> dict[str, Any]:
    pre = bundle.preprocessing
    d = decision
    rule = d.open_set
    return {
        "format": FORMAT, "labels": list(taught.labels), "class_ids": list(taught.class_ids),
        "workspace": {"id": taught.workspace_id, "version": taught.version},
        "model": {"name": model_name, "bundle_id": bundle.bundle_id},
        "input": {"name": PIXELS, "dtype": "uint8", "shape": ["N", pre.channels, pre.size, pre.size], "layout": "NCHW",
                  "how": "decode to `mode`, resize to round(size / crop) square with `resample`, keep the centre "
                         "size x size; the model divides by 255 and applies mean/std itself"},
        "preprocessing": {"mode": pre.mode, "size": pre.size, "resample": pre.resample, "crop": pre.crop,
                          "mean": None if pre.mean is None else list(pre.mean),
                          "std": None if pre.std is None else list(pre.std)},
        "decision": {"metric": d.metric, "head": head,
                     "rule": None if rule is None else rule.to_dict(), "threshold": d.threshold,
                     "cosine_scale": d.rule.cosine_scale},
        "outputs": {SCORES: "(N, K) float32: squared distance (euclidean) or cosine similarity to each class",
                    PROBS: "(N, K) float32: class probabilities; columns in `labels` order",
                    NOVELTY: "(N,) float64: how unlike its nearest class the image is; known when <= threshold",
                    LABEL_INDEX: f"(N,) int64: index into `labels`, {UNKNOWN_INDEX} = unknown"},
    }


def _served_embedder(bundle: Bundle) -> onnx.ModelProto:
    """The ONNX model the service runs for `bundle`, refused when its opset predates `MIN_OPSET`."""
    model = onnx.load_model(str(bundle.onnx_path))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise ConfigError(f"bundle {bundle.bundle_id}'s model {bundle.served_model} uses ONNX opset {opset}; the "
                          f"standalone export needs opset >= {MIN_OPSET}: re-export the model with a newer opset "
                          "(e.g. torch.onnx.export(..., opset_version=17)) and rebuild the bundle")
    return model


def build_classifier(bundle: Bundle, decision: ServedDecision, taught: TaughtClasses, *, model_name: str,
                     head: str) -> Standalone:
    """The workspace's classifier: the bundle's embedder (its `model.onnx`) with `decision` on the
    taught class memory baked in. `head`: the decision head as the labels file names it."""
    if not taught.labels:
        raise ConfigError(f"workspace {taught.workspace_id!r} has no classes; teach at least one class before exporting")
    embedder = _served_embedder(bundle)
    pre = _like(embedder, _input_graph(bundle.preprocessing))
    head_graph = _like(embedder, decision_graph(decision, taught.memory, bundle.embedding_dim, src=ONNX_OUTPUT))
    embedder = compose.add_prefix(embedder, EMBEDDER_PREFIX)
    model = compose.merge_models(pre, embedder, io_map=[(ONNX_INPUT, EMBEDDER_PREFIX + ONNX_INPUT)])
    model = compose.merge_models(model, head_graph, io_map=[(EMBEDDER_PREFIX + ONNX_OUTPUT, ONNX_OUTPUT)])
    model.producer_name = "fewshot standalone export"
    onnx.checker.check_model(model)
    return Standalone(model, _labels_file(taught, decision, bundle, model_name=model_name, head=head))
