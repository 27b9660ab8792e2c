"""Run-time choice of the fastest correct numeric precision (CPU and CUDA).

Policy, measured in `benchmarks/bench_learners.py`:

* CPU with native bf16 (AVX-512 BF16 or AMX-BF16): bf16 autocast + channels_last. Convolutions
  and matmuls run in bf16 through oneDNN; weights, optimiser state and losses stay fp32.
* CPU without native bf16 (older x86, ARM, macOS, Windows without the flags): fp32. Emulated bf16
  is slower than fp32, so it is never chosen automatically.
* CUDA: AMP; bf16 where the GPU supports it (Ampere and later), else fp16 with a GradScaler.

`FEWSHOT_PRECISION=fp32` (or `select_precision(..., prefer="fp32")`) switches back to fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

import torch
from torch import nn

from fewshot.errors import ConfigError

DType = Literal["fp32", "bf16", "fp16"]
ModuleT = TypeVar("ModuleT", bound=nn.Module)
_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
_PREFER = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PrecisionPolicy:
    """How to run a model: autocast dtype, memory format, and whether fp16 loss scaling is needed.

    dtype: "fp32" (autocast off), "bf16" or "fp16" (autocast on `device_type`).
    channels_last: store 4-D weights and inputs as NHWC (faster oneDNN convolutions on CPU).
    device_type: "cpu" or "cuda".
    """

    dtype: DType = "fp32"
    channels_last: bool = False
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(
                f"precision dtype {self.dtype!r} is unknown; use one of {sorted(_DTYPES)}"
            )
        if self.dtype == "fp16" and self.device_type == "cpu":
            raise ConfigError(
                "fp16 autocast on CPU is slow and unscaled; use 'bf16' or 'fp32' on CPU"
            )

    @property
    def autocast_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def uses_autocast(self) -> bool:
        return self.dtype != "fp32"

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == "fp16"


FP32 = PrecisionPolicy()


def _cpuinfo_flags() -> set[str]:
    """x86 feature flags from /proc/cpuinfo (Linux only; empty elsewhere, never raises)."""
    path = Path("/proc/cpuinfo")
    try:
        text = path.read_text() if path.is_file() else ""
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU executes bf16 dot products natively (AVX-512 BF16 or AMX-BF16)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    flags = _cpuinfo_flags()
    if flags & {"avx512_bf16", "amx_bf16"}:
        return True
    try:  # PyTorch names AMX-capable CPUs "AVX512_BF16"/"AMX" in some builds
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # pragma: no cover - very old builds
        return False
    return "BF16" in capability or "AMX" in capability


def select_precision(
    device: torch.device | str = "cpu", *, prefer: str = "auto"
) -> PrecisionPolicy:
    """The fastest correct policy for `device`; `prefer` ("auto", "fp32", "bf16", "fp16") overrides.

    The environment variable FEWSHOT_PRECISION, when set, takes the place of `prefer="auto"`.
    """
    if prefer == "auto":
        prefer = os.environ.get("FEWSHOT_PRECISION", "auto").lower()
    if prefer not in _PREFER:
        raise ConfigError(f"precision {prefer!r} is unknown; use one of {list(_PREFER)}")
    dev = torch.device(device)
    if dev.type == "cuda":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if prefer == "fp32":
            return PrecisionPolicy("fp32", False, "cuda")
        if prefer == "fp16" or (prefer == "auto" and not bf16_ok):
            return PrecisionPolicy("fp16", True, "cuda")
        return PrecisionPolicy("bf16", True, "cuda")
    if dev.type != "cpu":
        return PrecisionPolicy("fp32", False, dev.type)
    if prefer == "fp16":
        raise ConfigError("fp16 on CPU is not supported; use 'bf16' or 'fp32'")
    if prefer == "bf16" or (prefer == "auto" and cpu_has_native_bf16()):
        return PrecisionPolicy("bf16", True, "cpu")
    return PrecisionPolicy("fp32", False, "cpu")


def autocast_context(
    policy: PrecisionPolicy, device: torch.device | str | None = None
) -> contextlib.AbstractContextManager[object]:
    """`torch.autocast` for the policy, or a no-op for fp32."""
    device_type = torch.device(device).type if device is not None else policy.device_type
    if not policy.uses_autocast:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=policy.autocast_dtype)


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory that freed tensors leave, for the next step to reuse.

    glibc serves every allocation above 32 MiB (its largest mmap threshold) with a fresh mmap and
    unmaps it on free, so each training step page-faults and zeroes all of its large activations
    and gradients again (a Conv-4 step at 84 px: ~0.7 GB per 100 images); on a 2-core CPU that was
    ~40% of the step, in the kernel. With mmap off and a 2 GiB trim threshold they come from the
    heap and are reused: the process holds its high-water mark (~1.3x the mmap peak) instead of
    returning it between steps. Process-wide and once; a no-op off glibc, or when
    FEWSHOT_KEEP_FREED_MEMORY=0. Returns whether the setting is in force.

    Library code never calls it (it changes the whole process): the `fewshot` commands that train
    or evaluate do, at their start; a Python user who wants it calls it once, and a server must not.
    """
    if os.environ.get("FEWSHOT_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc without the usual soname
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))


def prepare_model(model: nn.Module, policy: PrecisionPolicy) -> nn.Module:
    """Put the model's 4-D tensors in the policy's memory format (in place; returns the model)."""
    if policy.channels_last:
        in_memory_format(model, torch.channels_last)
    return model


def in_memory_format(model: ModuleT, memory_format: torch.memory_format) -> ModuleT:
    """`model.to(memory_format=...)`: its 4-D parameters and buffers in `memory_format`, in place
    (torch's type stubs list no memory_format for `Module.to`, which takes one)."""
    to: Callable[..., nn.Module] = model.to
    to(memory_format=memory_format)
    return model


def prepare_input(x: torch.Tensor, policy: PrecisionPolicy) -> torch.Tensor:
    """(N, C, H, W) images in the policy's memory format; other ranks pass through."""
    if policy.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
