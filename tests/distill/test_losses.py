"""Each distillation loss against a value computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from fewshot.distill.losses import HintLoss, RKDAngle, RKDDistance, SoftLogitKD
from fewshot.errors import ConfigError


def test_soft_logit_kd_by_hand() -> None:
    s = torch.tensor([[0.0, 0.0]])  # uniform student
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher p = (0.75, 0.25) at T = 1
    # KL = 0.75 ln(0.75 / 0.5) + 0.25 ln(0.25 / 0.5)
    assert SoftLogitKD(1.0)(s, t)["kd"].item() == pytest.approx(0.130812036, abs=1e-6)
    # T = 2: p = (sqrt3, 1) / (sqrt3 + 1), KL = 0.0363408, times T^2 = 4
    assert SoftLogitKD(2.0, name="kd_episode")(s, t)["kd_episode"].item() == pytest.approx(0.145363131, abs=1e-6)
    assert SoftLogitKD(1.0)(t, t)["kd"].item() == pytest.approx(0.0, abs=1e-7)


def test_kd_refuses_bad_temperature_and_shapes() -> None:
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match=f"temperature must be > 0; got {bad}"):
            SoftLogitKD(bad)
    with pytest.raises(ConfigError, match="differ"):
        SoftLogitKD(1.0)(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hint_through_projector_by_hand() -> None:
    hint = HintLoss(2, 2)
    with torch.no_grad():
        hint.projector.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        hint.projector.bias.copy_(torch.tensor([0.0, 1.0]))
    # projection of (1, 1) is (1, 3); MSE to (0, 0) = (1 + 9) / 2
    assert hint(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2))["hint"].item() == pytest.approx(5.0)
    with pytest.raises(ConfigError, match="hint projector maps 2 -> 2"):
        hint(torch.ones(1, 3), torch.zeros(1, 2))


def test_rkd_distance_by_hand() -> None:
    # student: a 3-4-5 triangle (mean distance 4 -> 0.75, 1, 1.25); teacher: unit right triangle
    # (1, 1, sqrt2, mean (2 + sqrt2) / 3); smooth-L1 over the 3 x 3 matrix (off-diagonal twice)
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert RKDDistance()(s, t)["rkd_distance"].item() == pytest.approx(0.0034812488, abs=1e-6)
    # scale invariance: a scaled copy of the teacher has the same relations
    assert RKDDistance()(3.0 * t, t)["rkd_distance"].item() == pytest.approx(0.0, abs=1e-7)


def test_rkd_angle_by_hand() -> None:
    # student: right isosceles (angles 90, 45, 45: cos 0, 0.7071, 0.7071); teacher (0,0),(2,0),(0,1):
    # cos 0, 2/sqrt5, 1/sqrt5. Each distinct triplet appears twice among the 27 entries.
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    assert RKDAngle()(s, t)["rkd_angle"].item() == pytest.approx(0.0038012372, abs=1e-6)
    # dimensions may differ: relations only
    t3 = torch.cat([s, torch.zeros(3, 1)], dim=1)
    assert RKDAngle()(s, t3)["rkd_angle"].item() == pytest.approx(0.0, abs=1e-7)


def test_losses_give_gradients_to_the_student_only() -> None:
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    t = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    total = RKDDistance()(s, t)["rkd_distance"] + RKDAngle()(s, t)["rkd_angle"] + HintLoss(4, 8)(s, t)["hint"]
    total.backward()
    assert s.grad is not None and float(s.grad.abs().sum()) > 0
    assert t.grad is None
