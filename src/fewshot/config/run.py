"""The run config: every section of a run, and the tune section whose search paths must name its
fields."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from fewshot.config.sections import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    PipelineConfig,
    TrainConfig,
    ZooConfig,
    _Frozen,
)


class ParamSpec(_Frozen):
    """One search dimension of `tune.space`: float / int in [low, high] (log-uniform with `log`,
    on a grid with `step`), or one of `choices`."""
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check_range(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError(f"categorical needs a non-empty list of choices (got {self.choices!r}); "
                                 "e.g. choices: [32, 64]")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical takes only choices; remove low / high / log / step")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type} takes low and high, not choices; remove choices or use type: categorical")
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high (got low={self.low!r}, high={self.high!r}); "
                             "e.g. {type: float, low: 0.0001, high: 0.01, log: true}")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"int bounds must be whole numbers (got low={self.low!r}, high={self.high!r})")
        if not self.low < self.high:
            raise ValueError(f"low {self.low!r} must be < high {self.high!r}; swap them, or leave the "
                             "parameter out of the space to keep it fixed")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got low={self.low!r}); use e.g. low: 1e-6, or log: false")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; remove one of them")
        return self


# config fields a search may not sample: they name the run, or change how trials are scored
# fields that name the run or change how trials are scored (which classes or episodes validate them)
_UNTUNABLE = ("name", "output_dir", "tune", "zoo", "eval", "seed", "train.val_every", "train.val_episodes", "train.val_way",
              "train.val_shot", "train.val_query", "train.val_domain_mode", "data.split", "data.splits_dir", "data.split_seed",
              "data.root", "data.dataset", "data.lake_val_fraction", "data.lake_val_alphabets",
              "data.min_images_per_class", "data.first_level",
              "distill.generations", "distill.baseline")


class TuneConfig(_Frozen):
    """`fewshot tune`: an Optuna study over `space` (dotted config paths -> ParamSpec).

    Trials are scored by their best validation accuracy (the validation split only)."""
    metric: Literal["val_acc"] = "val_acc"  # maximised
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0  # the sampler's seed (plus the number of trials already in the study)
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = Field(4, ge=0)  # random trials before TPE, and unpruned trials before pruning
    warmup_steps: int = Field(0, ge=0)  # a trial is not pruned before this training step
    space: dict[str, ParamSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_paths(self) -> TuneConfig:
        for path in self.space:
            _check_config_path(path)
        return self


def _check_config_path(path: str) -> None:
    """`path` ("train.lr") names a config field, or a key inside a free-form dict (backbone_args)."""
    for bad in _UNTUNABLE:
        if path == bad or path.startswith(bad + "."):
            raise ValueError(f"{path!r} cannot be tuned (it names the run or changes how trials are scored); "
                             "remove it from tune.space")
    node: Any = RunConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = node.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ValueError(f"{path!r} is not a config field ({where} has: {', '.join(fields)}); "
                             "use a dotted path such as train.lr or model.backbone_args.hidden")
        ann = fields[part].annotation
        if typing.get_origin(ann) in (typing.Union, types.UnionType):
            ann = next(a for a in typing.get_args(ann) if a is not type(None))
        rest = parts[i + 1:]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not rest:
                raise ValueError(f"{path!r} is a config section; tune one of its fields, e.g. {path}.{next(iter(ann.model_fields))}")
            node = ann
            continue
        if rest and typing.get_origin(ann) is not dict:
            raise ValueError(f"{path!r}: {'.'.join(parts[:i + 1])} is a value, not a section; "
                             f"use {'.'.join(parts[:i + 1])}")
        return


class RunConfig(_Frozen):
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    distill: DistillConfig | None = None
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    tune: TuneConfig | None = None  # `fewshot tune`'s search space; `fewshot train` ignores it
    zoo: ZooConfig | None = None  # the model card of a zoo recipe; `fewshot train` ignores it

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.eval.split == "train":
            raise ValueError("eval.split 'train' would evaluate on trained classes; use 'test' (or 'val')")
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
