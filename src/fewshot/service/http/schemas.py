"""HTTP schemas: the request and response models of the JSON API (the OpenAPI schema the web page
codes against), and the conversions from the recogniser's answers and the store's records."""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fewshot.service.answers import Explanation, Prediction
from fewshot.service.insight_api import OcclusionOut
from fewshot.service.models import ServedModel
from fewshot.service.store import ClassRecord, WorkspaceRecord


class WorkspaceIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    settings: dict[str, Any] = Field(default_factory=dict)
    model: str | None = Field(None, max_length=200, description="one of GET /models; omitted: the default model")


class WorkspaceOut(BaseModel):
    id: str
    name: str
    settings: dict[str, Any]
    version: int
    model: str = Field(description="the model the workspace runs on (fixed at creation)")
    api_key: str | None = None  # only in the response that created the workspace
    threshold_why: dict[str, Any] | None = Field(None, description=(
        "the unknown threshold of the workspace's current version and why (the open-set rule's explain: `why`, "
        "and for the 'shape' rule `by_examples`: the threshold per example count; a threshold set on the workspace "
        "multiplies t(K, n), 1.0 is the calibrated point and larger accepts more); null without a rule"))


class SettingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: str | None = None
    head: str | None = None
    threshold: float | None = Field(None, allow_inf_nan=False, ge=0.0, description=(
        "the unknown threshold on the novelty scale (>= 0; larger accepts more); an explicit null clears it "
        "(back to the calibrated one), like clear_threshold"))

    @field_validator("threshold", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("threshold must be a number, not true/false")
        return v
    clear_threshold: bool = Field(False, description="back to the calibrated threshold; not with `threshold`")


class ClassOut(BaseModel):
    id: str
    label: str
    n_examples: int
    version: int
    example_ids: list[str] | None = None


class RenameIn(BaseModel):
    label: str = Field(min_length=1, max_length=200)


class CandidateOut(BaseModel):
    class_id: str
    label: str
    probability: float
    score: float


class PredictionOut(BaseModel):
    image: str
    label: str
    class_id: str | None
    known: bool
    probability: float
    score: float = Field(description="the nearest prototype's score: squared distance or cosine similarity")
    novelty: float | None = Field(description="how unlike its nearest class the image is (open-set rule); "
                                  "known when novelty <= threshold")
    threshold: float | None
    rule: str | None = Field(None, description="the open-set rule's kind, e.g. 'spread'")
    metric: str
    top_k: list[CandidateOut]
    out_of_domain: bool = Field(False, description="the image is far outside what the model was trained on; "
                                "the answer is given but should not be trusted")
    domain_score: float | None = Field(None, description="> 1: out of domain; null when the bundle has no domain summary")
    domain_reasons: list[str] = Field(default_factory=list)
    effective_threshold: float | None = Field(None, description=(
        "the answered class's own threshold: t(K, n) x threshold on 1 - centred cosine for the 'shape' rule "
        "(K classes, n examples of that class), the threshold itself for the others; null without a rule"))
    threshold_why: dict[str, Any] | None = Field(None, description=(
        "which threshold the workspace uses and why (the open-set rule's explain: `why`, and for 'shape' "
        "`by_examples`, the threshold per example count); null without a rule"))
    confidence: float = Field(0.0, description=(
        "on the decision's scale: 1 - novelty / (2 threshold), clipped to 0..1; known exactly when >= 0.5 "
        "(the probability when there is no open-set rule)"))
    summary: str = Field("", description="the answer and why, in words (e.g. why it is 'unknown')")
    advice: str = Field("", description="what to do next (add examples, change the threshold)")


class ClassifyOut(BaseModel):
    predictions: list[PredictionOut]
    bundle_id: str
    model: str


class NeighbourOut(BaseModel):
    example_id: str
    class_id: str
    label: str
    score: float
    thumbnail_png_base64: str


class ExplainOut(BaseModel):
    prediction: PredictionOut
    neighbours: list[NeighbourOut]


class OcclusionPredictionOut(OcclusionOut):
    prediction: PredictionOut


def class_out(rec: ClassRecord, example_ids: list[str] | None = None) -> ClassOut:
    return ClassOut(id=rec.id, label=rec.label, n_examples=rec.n_examples, version=rec.version, example_ids=example_ids)


def prediction_out(name: str, p: Prediction) -> PredictionOut:
    return PredictionOut(image=name, label=p.label, class_id=p.class_id, known=p.known, probability=p.probability,
                         score=p.score, novelty=p.novelty, threshold=p.threshold, rule=p.rule, metric=p.metric,
                         out_of_domain=p.out_of_domain, domain_score=p.domain_score,
                         domain_reasons=list(p.domain_reasons), effective_threshold=p.effective_threshold,
                         threshold_why=p.threshold_why, confidence=p.confidence, summary=p.summary, advice=p.advice,
                         top_k=[CandidateOut(**c.__dict__) for c in p.top_k])


def explain_out(name: str, e: Explanation) -> ExplainOut:
    return ExplainOut(prediction=prediction_out(name, e.prediction), neighbours=[
        NeighbourOut(example_id=n.example_id, class_id=n.class_id, label=n.label, score=n.score,
                     thumbnail_png_base64=base64.b64encode(n.thumbnail_png).decode()) for n in e.neighbours])



def workspace_out(rec: WorkspaceRecord, model: ServedModel, api_key: str | None = None,
                  why: dict[str, Any] | None = None) -> WorkspaceOut:
    return WorkspaceOut(id=rec.id, name=rec.name, settings=rec.settings, version=rec.version, model=model.name,
                        api_key=api_key, threshold_why=why)


class HeadScoreOut(BaseModel):
    head: str
    evaluated: int = Field(description="held-out examples (classes with 2 or more examples)")
    correct: int = Field(description="answered with their class (forced choice)")
    right: int = Field(description="answered with their class and accepted (not 'unknown'): what is served")
    accuracy: float | None


class AdaptOut(BaseModel):
    head: str = Field(description="the head the workspace serves now")
    previous: str
    changed: bool
    chosen: str | None = Field(description="the head the measurement chose; null: too few examples to compare")
    why: str
    folds: int
    scores: list[HeadScoreOut]
    classes: int
    examples: int
    measured_version: int
    measured_unix: float
    workspace: WorkspaceOut

