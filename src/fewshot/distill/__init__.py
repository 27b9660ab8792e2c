"""Knowledge distillation: frozen teachers (runs or bundles, several at once), losses as small
modules returning named terms, born-again generations, and a report per distillation.

    from fewshot.distill import distill
    distill(load_config("configs/distill/student_omniglot.yaml"))
"""

from fewshot.distill.losses import HintLoss, RKDAngle, RKDDistance, SoftLogitKD
from fewshot.distill.task import DistillObjective, distill
from fewshot.distill.teacher import Teacher, load_teacher

__all__ = ["DistillObjective", "HintLoss", "RKDAngle", "RKDDistance", "SoftLogitKD", "Teacher", "distill",
           "load_teacher"]
