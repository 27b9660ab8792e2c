"""Checkpoints without pickle: tensors in safetensors, everything else in a JSON manifest.

A checkpoint is a folder `<run>/checkpoints/<tag>/` with
  model.safetensors   the learner's state_dict (backbone and any meta-parameters)
  state.safetensors   optimizer tensors (for exact resume; training uses only explicit generators)
  objective.safetensors  a distillation objective's projectors (distilled runs only)
  manifest.json       step, model arguments, config, data fingerprint, metrics, versions,
                      and the non-tensor skeleton of the optimizer state
The folder is written beside its final place and renamed into it, so a kill never leaves a
checkpoint that loads half-written.
"""

from __future__ import annotations

import json
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fewshot import __version__
from fewshot.errors import CheckpointError
from fewshot.io import atomic_write_json, replace_dir

CHECKPOINT_FORMAT = 1


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}, collecting them."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def versions() -> dict[str, str]:
    return {"fewshot": __version__, "torch": torch.__version__, "python": platform.python_version()}


def save_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    manifest: dict[str, Any],
    extra: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Atomically write a checkpoint folder at `path` (replacing an older one). `extra` maps file
    names to further modules saved beside the model (a distillation objective's projectors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        for fname, module in (extra or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp / fname))
        state_tensors: dict[str, torch.Tensor] = {}
        opt_skeleton = _flatten(optimizer.state_dict(), "opt", state_tensors) if optimizer else None
        save_file(state_tensors, str(tmp / "state.safetensors"))
        full = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "versions": versions(),
            **manifest,
            "optimizer": opt_skeleton,
        }
        atomic_write_json(tmp / "manifest.json", full)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, path)


def read_manifest(path: Path) -> dict[str, Any]:
    mf = path / "manifest.json"
    if not mf.is_file():
        raise CheckpointError(f"no checkpoint at {path} (missing manifest.json); train the run first")
    manifest: dict[str, Any] = json.loads(mf.read_text(encoding="utf-8"))
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {manifest.get('format')!r}; this fewshot {__version__} reads "
            f"format {CHECKPOINT_FORMAT}. Retrain, or load it with the fewshot version that wrote it "
            f"({manifest.get('versions', {}).get('fewshot', 'unknown')})"
        )
    return manifest


def load_weights(path: Path, model: torch.nn.Module, *, name: str = "model.safetensors") -> None:
    """Load model weights, naming what differs when the architecture does not match."""
    if not (path / name).is_file():
        raise CheckpointError(f"checkpoint {path} has no {name}; it was written by another kind of run")
    weights = load_file(str(path / name))
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {shapes[:5]}. Build the model from the checkpoint's "
            "manifest (model section) instead of new arguments"
        )
    model.load_state_dict(weights)


def load_training_state(path: Path, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore the optimizer state saved by `save_checkpoint`."""
    manifest = read_manifest(path)
    tensors = load_file(str(path / "state.safetensors"))
    if optimizer is not None and manifest.get("optimizer") is not None:
        state = _unflatten(manifest["optimizer"], tensors)
        state["state"] = {int(k): v for k, v in state["state"].items()}
        optimizer.load_state_dict(state)
    # no RNG state: training draws only from explicit generators (episodes, batches, initialisation),
    # so a resume never writes the process-wide RNG
