"""A trained run folder, read back: the folder check, the trained learner (no pickle), its train
classes, and the device a run names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewshot.backbones import backbone_from_config
from fewshot.errors import CheckpointError, ConfigError
from fewshot.learners import learner_from_config
from fewshot.training.checkpoint import load_weights, read_manifest


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use device=auto or cpu")
    return dev


def check_run_dir(run_dir: Path) -> Path:
    """A run folder made by `fewshot train`, or a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml); pass a folder made by `fewshot train`")
    return run_dir


def load_trained(run_dir: Path, *, tag: str = "best", device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild a trained learner from its run folder (no pickle): returns (learner, manifest)."""
    path = check_run_dir(run_dir) / "checkpoints" / tag
    manifest = read_manifest(path)
    backbone = backbone_from_config(manifest["model"]["backbone"])
    learner = learner_from_config(manifest["model"]["learner"], backbone)
    load_weights(path, learner)
    learner.to(resolve_device(device)).eval()
    return learner, manifest


def train_classes(run_dir: Path) -> set[str]:
    path = Path(run_dir) / "train_classes.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; it is written by `fewshot train`")
    return set(json.loads(path.read_text(encoding="utf-8"))["classes"])
