"""fewshot.precision: policy selection, forced fp32, and learners training under bf16."""

from __future__ import annotations

import pytest
import torch

from fewshot import precision
from fewshot.errors import ConfigError
from fewshot.learners import create_learner
from fewshot.precision import FP32, PrecisionPolicy, autocast_context, select_precision
from fewshot.training.trainer import Trainer


def test_forced_fp32_by_argument_and_environment(monkeypatch):
    assert select_precision("cpu", prefer="fp32") == FP32
    monkeypatch.setenv("FEWSHOT_PRECISION", "fp32")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert select_precision("cpu") == FP32


def test_cpu_auto_follows_native_bf16(monkeypatch):
    monkeypatch.delenv("FEWSHOT_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert select_precision("cpu") == PrecisionPolicy("bf16", True, "cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert select_precision("cpu") == FP32


def test_cpu_flag_detection_never_raises(monkeypatch):
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(precision.platform, "machine", lambda: "arm64")
    assert precision.cpu_has_native_bf16() is False
    precision.cpu_has_native_bf16.cache_clear()


def test_bad_precision_names_are_config_errors():
    with pytest.raises(ConfigError, match="precision 'fp8' is unknown"):
        select_precision("cpu", prefer="fp8")
    with pytest.raises(ConfigError, match="fp16 on CPU"):
        select_precision("cpu", prefer="fp16")


def test_fp32_autocast_is_a_no_op():
    a = torch.rand(4, 4)
    with autocast_context(FP32, "cpu"):
        assert (a @ a).dtype == torch.float32
    with autocast_context(PrecisionPolicy("bf16", True, "cpu"), "cpu"):
        assert (a @ a).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_bf16_training_step_matches_fp32_closely(name, episodes, small_conv4):
    eps = episodes(2)
    losses = {}
    for policy in (FP32, PrecisionPolicy("bf16", True, "cpu")):
        learner = create_learner(name, small_conv4(0)).set_precision(policy)
        opt = torch.optim.SGD(learner.parameters(), lr=0.01)
        losses[policy.dtype] = step_with(learner, eps, opt)["loss"]
        assert next(learner.parameters()).dtype == torch.float32  # master weights stay fp32
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def step_with(learner, batch, opt):  # type: ignore[no-untyped-def]
    """One optimiser step by the one trainer."""
    return Trainer(learner, opt).step(batch)
