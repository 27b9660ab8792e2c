"""The stretches of work a run was trained in: `segments.json` in the run folder.

A long run is cut into stretches (a session ends, a machine is taken away) and resumed exactly
from its last checkpoint. Each `train` call is one segment: the steps it covered, its training
seconds, the threads and processes it had, the commit and torch version it ran on, and the
command. The file is rewritten (atomically) with every `last` checkpoint, so a killed segment is
recorded up to the checkpoint the next one resumes from; on resume, anything past that checkpoint
is cut off, like the rows of metrics.csv. Model cards list the segments and sum their CPU-hours.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewshot import __version__
from fewshot.io import atomic_write_json

SEGMENTS = "segments.json"


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def code_commit() -> str | None:
    """The git commit of the code that runs (the checkout holding this package), with "-dirty" when
    its code or configs differ from it (a run folder committed in the same checkout does not count);
    None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/configs",
                                ":/pyproject.toml"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _command() -> str:
    """This process's command line, as a user would type it (`fewshot ...` also for `python -m fewshot`)."""
    if not sys.argv:
        return ""
    prog = Path(sys.argv[0]).name
    return " ".join(["fewshot" if prog in ("fewshot", "__main__.py") else prog, *sys.argv[1:]])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_hours(segment: dict[str, Any]) -> float:
    """Core-hours a segment held: training seconds x threads x processes (on a GPU, device-hours)."""
    per = 1 if str(segment.get("device", "cpu")).startswith("cuda") else int(segment.get("threads", 1))
    return float(segment["train_seconds"]) * per * int(segment.get("world_size", 1)) / 3600.0


@dataclass
class SegmentLog:
    """The run's segments; `open` starts a new one at the resume step, `update` records progress."""

    path: Path
    segments: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> SegmentLog:
        path = Path(run_dir) / SEGMENTS
        segments = json.loads(path.read_text(encoding="utf-8"))["segments"] if path.is_file() else []
        return cls(path, segments)

    @classmethod
    def open(cls, run_dir: Path, start_step: int, *, device: str, precision: str, world_size: int) -> SegmentLog:
        """Cut the log at `start_step` (the checkpoint resumed from) and begin a new segment there."""
        log = cls.read(run_dir)
        kept = [s for s in log.segments if int(s["start_step"]) < start_step]
        if kept and int(kept[-1]["end_step"]) > start_step:
            kept[-1] = {**kept[-1], "end_step": start_step, "note": "cut at the checkpoint the next segment resumed"}
        kept.append({
            "index": len(kept) + 1, "start_step": start_step, "end_step": start_step, "train_seconds": 0.0,
            "started_at": _utc_now(), "ended_at": _utc_now(), "commit": code_commit(), "torch": torch.__version__,
            "fewshot": __version__, "python": platform.python_version(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "world_size": world_size,
            "device": device, "precision": precision,
            "command": _command(),
        })
        log.segments = kept
        log.write()
        return log

    def update(self, end_step: int, train_seconds: float) -> None:
        """The current segment reached `end_step` (a checkpoint) after `train_seconds` of training."""
        self.segments[-1].update(end_step=end_step, train_seconds=round(train_seconds, 2), ended_at=_utc_now())
        self.write()

    def write(self) -> None:
        atomic_write_json(self.path, {"segments": self.segments})

    def total_cpu_hours(self) -> float:
        return sum(cpu_hours(s) for s in self.segments)
