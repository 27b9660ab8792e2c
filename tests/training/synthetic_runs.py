"""Tiny synthetic collections and run configs for training, export and distillation tests
(a uniquely named module: `import conftest` is ambiguous across test folders)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.config import RunConfig, config_from_dict
from fewshot.data.cache import ClassInfo, PackedCache, write_cache
from fewshot.data.imageio import Preprocessing
from fewshot.training.data import RunData


@dataclass(frozen=True)
class _Split:
    name: str
    class_ids: np.ndarray
    rotations: np.ndarray


def synthetic_cache(root: Path, n_classes: int = 24, per_class: int = 8, size: int = 16) -> PackedCache:
    """Each class is a fixed random binary pattern plus per-image noise: learnable, not trivial."""
    rng = np.random.default_rng(0)
    protos = rng.random((n_classes, 1, size, size)) < 0.3
    imgs, classes, files = [], [], []
    for c in range(n_classes):
        noise = rng.random((per_class, 1, size, size)) < 0.08
        imgs.append(((protos[c] ^ noise) * 255).astype(np.uint8))
        dom = f"D{c % 3}"
        classes.append(ClassInfo(f"{dom}/c{c}", dom, "", c * per_class, per_class))
        files += [f"{dom}/c{c}/{i}.png" for i in range(per_class)]
    write_cache(root / "cache", np.concatenate(imgs), classes, files, Preprocessing(size=size), "synthetic")
    return PackedCache.open(root / "cache")


def run_data(cache: PackedCache) -> RunData:
    n = len(cache.classes)
    ids = np.arange(n)
    z = np.zeros
    splits = {
        "train": _Split("train", ids[:12], z(12, dtype=np.int64)),
        "val": _Split("val", ids[12:18], z(6, dtype=np.int64)),
        "test": _Split("test", ids[18:], z(n - 18, dtype=np.int64)),
    }
    return RunData(cache, splits, "synthetic")


def config(tmp_path: Path, learner: str = "protonet", *, name: str | None = None, model: dict[str, Any] | None = None,
           extra: dict[str, Any] | None = None, **train: object) -> RunConfig:
    t = {"steps": 6, "way": 4, "shot": 2, "query": 3, "val_every": 3, "val_episodes": 10, "val_way": 3, "val_query": 5,
         "checkpoint_every": 3, "precision": "fp32", "device": "cpu", "lr": 1e-3, **train}
    m = {"learner": learner, "backbone": "conv4", "backbone_args": {"hidden": 8}, **(model or {})}
    return config_from_dict({"name": name or f"t-{learner}", "output_dir": str(tmp_path / "runs"),
                             "model": m, "train": t, "data": {"image_size": 16}, **(extra or {})})
