"""JSON shapes of the insight routes (GET /workspaces/{ws}/insight, POST /workspaces/{ws}/occlusion):
response models over `fewshot.service.insight`, for the OpenAPI schema the web page codes against."""

from __future__ import annotations

import base64

import numpy as np
from pydantic import BaseModel, Field

from fewshot.service.images import array_thumbnail
from fewshot.service.insight import Insight, OcclusionMap


class ClassInsightOut(BaseModel):
    class_id: str
    label: str
    n_examples: int
    evaluated: int = Field(description="examples held out and classified without themselves")
    correct: int = Field(description="held-out examples answered with their own class (forced choice)")
    rejected: int = Field(description="held-out examples the unknown threshold would answer 'unknown'")
    accuracy: float | None = Field(description="correct / evaluated; null when not measurable (see note)")
    note: str | None = None


class ConfusedPairOut(BaseModel):
    a: str = Field(description="class id")
    b: str = Field(description="class id")
    a_label: str
    b_label: str
    a_as_b: int = Field(description="held-out examples of a answered as b")
    b_as_a: int
    hint: str


class InsightOut(BaseModel):
    version: int = Field(description="the workspace version these numbers describe")
    method: str = Field(description="'leave-one-out' (prototype rule) or 'k-fold cross-validation' (probe)")
    evaluated: int
    accuracy: float | None
    classes: list[ClassInsightOut]
    confusion: list[list[int]] = Field(description="rows: true class, columns: answer, in the order of `classes`")
    pairs: list[ConfusedPairOut] = Field(description="the most confused pairs, most confused first")
    notes: list[str]


class OcclusionOut(BaseModel):
    class_id: str = Field(description="the class the map explains (the forced-choice answer)")
    label: str
    cells: int = Field(description="the map is cells x cells over the model input")
    patch: int = Field(description="side of an occluding patch in model-input pixels")
    input_size: int
    input_png_base64: str = Field(description="the model input the map is over (after resizing and cropping), as PNG")
    base_margin: float = Field(description="the class's logit minus the runner-up's on the intact image")
    drop: list[list[float]] = Field(description="row-major (cells, cells): margin lost when that region is "
                                    "covered; > 0: the region supported the answer")


def insight_out(ins: Insight) -> InsightOut:
    return InsightOut(
        version=ins.version, method=ins.method, evaluated=ins.evaluated, accuracy=ins.accuracy,
        classes=[ClassInsightOut(**c.__dict__) for c in ins.classes], confusion=ins.confusion.tolist(),
        pairs=[ConfusedPairOut(a=ins.class_ids[p.a], b=ins.class_ids[p.b], a_label=ins.labels[p.a],
                               b_label=ins.labels[p.b], a_as_b=p.a_as_b, b_as_a=p.b_as_a, hint=p.hint)
               for p in ins.pairs],
        notes=list(ins.notes))


def occlusion_out(m: OcclusionMap, image: np.ndarray, class_id: str, label: str) -> OcclusionOut:
    """`image`: the model input (C, S, S) uint8 the map was made on."""
    png = base64.b64encode(array_thumbnail(image, m.size)).decode()
    return OcclusionOut(class_id=class_id, label=label, cells=m.drop.shape[0], patch=m.patch, input_size=m.size,
                        input_png_base64=png, base_margin=m.base_margin, drop=m.drop.round(6).tolist())
