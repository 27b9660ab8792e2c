"""decision stage: the served decision ("what is evaluated is what is served").

* `rule`: the heads (nearest prototype, Snell et al. 2017; linear probe, Tian et al. 2020) in torch,
  and `DecisionRule`, the head's description that learners carry.
* `openset`: `OpenSetRule`, the novelty of a query for the class it is answered with, and its threshold
  ("global", "spread", or "shape": a threshold that follows the number of classes and examples,
  on a cosine measured from a centre; `OpenSetRule.explain` says which threshold a workspace uses and why).
* `memory`: the per-class memory (sums, squared-norm sums, counts, fitted probe) a decision works on,
  and its leave-one-out form.
* `views`: the views of a taught image averaged into the embedding its class keeps
  (`example_embeddings`; `DecisionRule.views`), the one place taught images become class memory.
* `served`: `ServedDecision` (head + open-set rule, frozen), `BundleDecision` (what a bundle's
  manifest stores) and `decide`, the one function from embeddings to scores, probabilities, label,
  novelty and known/unknown; `onnx_form` builds the same decision as an ONNX graph.

Calibration, export's measurement as served, the service, its insight panel, distillation teachers
and the standalone export all call `decide` (or its ONNX form).
"""

from fewshot.decision.memory import ClassMemory, LeaveOneOut
from fewshot.decision.openset import OpenSetRule, class_spread
from fewshot.decision.rule import (
    METRICS,
    RULES,
    DecisionRule,
    Metric,
    Probe,
    Rule,
    check_metric,
    fit_probe,
    prototype_logits,
    prototype_scores,
    prototypes,
    scores_to_logits,
)
from fewshot.decision.served import (
    Answer,
    BundleDecision,
    Head,
    Memory,
    ServedDecision,
    decide,
    episode,
    fit_memory,
    softmax,
)
from fewshot.decision.views import VIEW_COUNT, VIEWS, default_shift, example_embeddings, view_images

__all__ = [
    "METRICS", "RULES", "Answer", "BundleDecision", "ClassMemory", "DecisionRule", "Head", "LeaveOneOut", "Memory",
    "Metric", "OpenSetRule", "Probe", "Rule", "ServedDecision", "check_metric", "class_spread", "decide", "episode",
    "fit_memory", "fit_probe", "prototype_logits", "prototype_scores", "prototypes", "scores_to_logits", "softmax",
    "VIEWS", "VIEW_COUNT", "default_shift", "example_embeddings", "view_images",
]
