"""Distillation losses: small modules, each returning named terms.

All take student tensors first and teacher tensors second; teacher tensors are detached here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.errors import ConfigError


class SoftLogitKD(nn.Module):
    """Soft-logit knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in
    a Neural Network", arXiv:1503.02531):

        KD = T^2 * KL( softmax(t / T) || softmax(s / T) ),  averaged over rows,

    the T^2 keeping gradient magnitudes comparable across temperatures. Works on base-class logits
    (B, num_classes) and on episode logits (n_query, n_way) alike."""

    def __init__(self, temperature: float = 4.0, name: str = "kd") -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"KD temperature must be > 0; got {temperature} (Hinton et al. use 1-20, e.g. 4)")
        self.temperature, self.name = float(temperature), name

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> dict[str, Tensor]:
        if student_logits.shape != teacher_logits.shape:
            raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                              f"{tuple(teacher_logits.shape)} differ; distil over the same classes")
        t = self.temperature
        log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
        p_t = F.softmax(teacher_logits.detach().float() / t, dim=-1)
        kl = F.kl_div(log_p_s, p_t, reduction="batchmean")
        return {self.name: kl * t * t}


class HintLoss(nn.Module):
    """Feature hints through a learned projector (Romero et al. 2015, "FitNets: Hints for Thin Deep
    Nets", arXiv:1412.6550): a linear regressor maps the student's embedding (N, d_s) to the
    teacher's width (N, d_t); the hint is the mean squared error to the teacher's embedding.
    Here the hint layer is the embedding (the backbone's output), so any backbone pair works."""

    def __init__(self, student_dim: int, teacher_dim: int, name: str = "hint") -> None:
        super().__init__()
        self.projector = nn.Linear(student_dim, teacher_dim)
        self.name = name

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        if teacher.shape[1] != self.projector.out_features or student.shape[1] != self.projector.in_features:
            raise ConfigError(f"hint projector maps {self.projector.in_features} -> {self.projector.out_features} "
                              f"dims; got student {student.shape[1]}, teacher {teacher.shape[1]}")
        return {self.name: F.mse_loss(self.projector(student.float()), teacher.detach().float())}


def _subsample(x: Tensor, max_points: int) -> Tensor:
    """At most `max_points` rows, evenly spaced (deterministic: the same rows for both models)."""
    if x.shape[0] <= max_points:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, max_points, device=x.device).round().long()
    return x[idx]


class RKDDistance(nn.Module):
    """Relational KD, distance term (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR
    2019, arXiv:1904.05068): pairwise distances of the embeddings, each normalised by its mean over
    the batch, matched with the Huber (smooth L1) loss. Dimensions may differ: only relations
    between samples are compared. At most `max_points` samples per batch (memory)."""

    def __init__(self, max_points: int = 128, name: str = "rkd_distance") -> None:
        super().__init__()
        self.max_points, self.name = max_points, name

    @staticmethod
    def normalised_distances(z: Tensor) -> Tensor:
        d = torch.cdist(z, z)  # (N, N)
        mean = d[d > 0].mean() if bool((d > 0).any()) else d.new_tensor(1.0)
        return d / mean

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        s = _subsample(student.float(), self.max_points)
        with torch.no_grad():
            t = self.normalised_distances(_subsample(teacher.detach().float(), self.max_points))
        return {self.name: F.smooth_l1_loss(self.normalised_distances(s), t)}


class RKDAngle(nn.Module):
    """Relational KD, angle term (Park et al. 2019): for every triplet (i, j, k) the cosine of the
    angle at j, <unit(z_i - z_j), unit(z_k - z_j)>, matched with the Huber loss. O(N^3): at most
    `max_points` samples per batch (default 48: 110k triplets)."""

    def __init__(self, max_points: int = 48, name: str = "rkd_angle") -> None:
        super().__init__()
        self.max_points, self.name = max_points, name

    @staticmethod
    def angles(z: Tensor) -> Tensor:
        e = F.normalize(z[None, :, :] - z[:, None, :], p=2, dim=2)  # (N, N, D): e[j, i] = unit(z_i - z_j)
        return torch.bmm(e, e.transpose(1, 2)).reshape(-1)  # (N * N * N,)

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        s = _subsample(student.float(), self.max_points)
        with torch.no_grad():
            t = self.angles(_subsample(teacher.detach().float(), self.max_points))
        return {self.name: F.smooth_l1_loss(self.angles(s), t)}
