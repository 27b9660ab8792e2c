"""From a config to a packed cache, splits and class pools (the data the loops consume)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.config import DataConfig
from fewshot.data.cache import PackedCache
from fewshot.data.imageio import Preprocessing
from fewshot.data.prepare import PreparedData, prepare
from fewshot.data.sources import ImageFolderSource, OmniglotSource, Source
from fewshot.data.splitfiles import (
    MINIIMAGENET_SPLITS,
    SplitFileSource,
    miniimagenet_dir,
    miniimagenet_source,
)
from fewshot.data.splits import make_splits
from fewshot.episodes.materialise import pool_from_split
from fewshot.episodes.sampling import ClassPool
from fewshot.errors import ConfigError


@dataclass(frozen=True)
class RunData:
    cache: PackedCache
    splits: dict[str, Any]  # name -> fewshot.data.splits.Split
    scheme: str

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(
                f"split {split!r} does not exist in scheme {self.scheme!r}; available: {sorted(self.splits)}"
            )

    def pool(self, split: str, *, add_rotations: bool = False) -> ClassPool:
        self.check_split(split)
        return pool_from_split(self.cache, self.splits[split], add_rotations=add_rotations)

    def class_names(self, split: str) -> list[str]:
        self.check_split(split)
        return sorted({self.cache.classes[int(i)].name for i in self.splits[split].class_ids})


def preprocessing_of(cfg: DataConfig) -> Preprocessing:
    return Preprocessing(mode=cfg.mode, size=cfg.image_size, crop=cfg.crop,
                         mean=None if cfg.mean is None else tuple(cfg.mean),
                         std=None if cfg.std is None else tuple(cfg.std))


def _under_root(cfg: DataConfig, value: str) -> Path:
    """`value` as given when absolute or present from the working directory, else under the data root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() or path.exists() else cfg.data_root() / path


def splits_dir_of(cfg: DataConfig) -> Path | None:
    """The folder of split files `cfg` names (split "csv" / split-file sources); None when none."""
    if cfg.splits_dir is not None:
        return _under_root(cfg, cfg.splits_dir)
    if cfg.dataset == "miniimagenet":

        return miniimagenet_dir(cfg.data_root()) / MINIIMAGENET_SPLITS
    return None


def source_of(cfg: DataConfig) -> Source:
    """The raw source `cfg` names: the Omniglot zips, miniImageNet, or an image folder / zip (with
    split files when `cfg.splits_dir` is set)."""
    root = cfg.data_root()
    if cfg.dataset == "omniglot":
        return OmniglotSource(root)
    if cfg.dataset == "miniimagenet":
        return miniimagenet_source(root, splits_dir_of(cfg))
    path = _under_root(cfg, cfg.dataset)
    splits_dir = splits_dir_of(cfg)
    if splits_dir is not None:
        return SplitFileSource(path, splits_dir)
    return ImageFolderSource(path, first_level=cfg.first_level)


def prepare_data(cfg: DataConfig, *, progress: bool = True, force: bool = False) -> PreparedData:
    """Prepare (or reuse) the packed cache that `cfg` describes (see `source_of`)."""
    return prepare(source_of(cfg), Path(cfg.cache_dir), preprocessing_of(cfg),
                   min_images_per_class=cfg.min_images_per_class if cfg.dataset != "omniglot" else 2,
                   progress=progress, force=force)


def load_run_data(cfg: DataConfig, *, progress: bool = True) -> RunData:
    """Prepare (or reuse) the cache for `cfg` and build its splits."""
    prepared = prepare_data(cfg, progress=progress)
    splits_dir: Path | None
    if cfg.dataset == "omniglot":
        splits_dir = cfg.data_root() / "omniglot" / "splits" / "vinyals"
    else:
        splits_dir = splits_dir_of(cfg)
    kwargs: dict[str, Any] = {}
    if cfg.split == "lake":
        kwargs["fractions"] = (1.0 - cfg.lake_val_fraction, cfg.lake_val_fraction, 0.0)
        kwargs["val_alphabets"] = cfg.lake_val_alphabets
    elif cfg.lake_val_alphabets:
        raise ConfigError(f"data.lake_val_alphabets={cfg.lake_val_alphabets} needs data.split 'lake', not "
                          f"{cfg.split!r}; set it to 0")
    splits = make_splits(prepared.cache, cfg.split, seed=cfg.split_seed, splits_dir=splits_dir, **kwargs)
    return RunData(prepared.cache, splits, cfg.split)


def images_by_class(data: RunData, split: str, *, limit: int | None = None) -> dict[str, np.ndarray]:
    """Unrotated images of each class of `split`: name -> uint8 (n, C, H, W)."""
    out: dict[str, np.ndarray] = {}
    for cid in dict.fromkeys(int(i) for i in data.splits[split].class_ids):
        out[data.cache.classes[cid].name] = np.asarray(data.cache.class_images(cid))
        if limit is not None and len(out) >= limit:
            break
    return out
