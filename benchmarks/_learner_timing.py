"""Shared timing helpers for the learner benchmarks (interleaved repeats; medians and minima)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fewshot.episodes.types import Episode


def machine() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _busy_and_total_jiffies() -> tuple[int, int]:
    """Machine-wide CPU time (busy, total) in clock ticks from /proc/stat's first line."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, *rest = map(int, f.readline().split()[1:])
    steal = rest[0] if rest else 0
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def other_busy_cores(window_s: float = 2.0) -> float | None:
    """Cores' worth of CPU time used by *other* processes over a `window_s` window (this
    process and its children excluded); None where /proc/stat is missing (not Linux)."""
    if not os.path.exists("/proc/stat"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    own0, (busy0, _) = sum(os.times()[:4]), _busy_and_total_jiffies()
    t0 = time.monotonic()
    time.sleep(window_s)
    own1, (busy1, _) = sum(os.times()[:4]), _busy_and_total_jiffies()
    elapsed = time.monotonic() - t0
    return max(0.0, ((busy1 - busy0) / tick - (own1 - own0)) / elapsed)


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call for each fn; calls are interleaved so machine load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def summary(ts: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "n": len(ts)}


def random_episode(
    g: torch.Generator, n_way: int, n_shot: int, n_query: int, c: int = 1, size: int = 28
) -> Episode:
    """Random images: timing does not depend on pixel values."""
    return Episode(
        support_x=torch.rand(n_way * n_shot, c, size, size, generator=g),
        support_y=torch.arange(n_way).repeat_interleave(n_shot),
        query_x=torch.rand(n_way * n_query, c, size, size, generator=g),
        query_y=torch.arange(n_way).repeat_interleave(n_query),
        class_ids=torch.arange(n_way),
        rotations=torch.zeros(n_way, dtype=torch.long),
    )


def write_json(path: str, payload: dict[str, object]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"\nraw numbers: {out}")
