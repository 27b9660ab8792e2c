"""Typed, frozen, validated configuration: YAML is data, command-line overrides are `a.b=value`.

A wrong field is named with the fix (pydantic's `extra="forbid"`), values are checked on load,
and the resolved config is echoed into the run folder so a run always says how it was made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fewshot.data.imageio import ImageError, Preprocessing
from fewshot.errors import ConfigError
from fewshot.io import atomic_write_text


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Defaults a named dataset brings, for the fields a config leaves out (explicit values win).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "miniimagenet": {"image_size": 84, "mode": "RGB", "split": "csv"},
}


def _tuple(values: list[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


class DataConfig(_Frozen):
    root: str | None = None  # data root; default: $FEWSHOT_DATA
    # "omniglot", "miniimagenet" (<root>/miniimagenet/miniimagenet84.zip + splits/ravi/*.csv),
    # or a path to an image folder / zip (with splits_dir: class folders listed in split files)
    dataset: str = "omniglot"
    image_size: int = Field(28, ge=8, le=512)
    mode: Literal["L", "RGB"] = "L"
    # model input: images squashed to round(image_size / crop) square, the centre image_size kept,
    # then x / 255 and, when both are given, (x - mean) / std per channel (fewshot.data.imageio)
    crop: float = Field(1.0, gt=0, le=1)
    mean: list[float] | None = None
    std: list[float] | None = None
    split: str = "vinyals"  # lake | vinyals | csv | domains | classes
    # folder of split files {train,val,test}.csv (`filename,label`) for split "csv"; a relative path
    # that does not exist from the working directory is taken under the data root. miniimagenet's
    # default: <root>/miniimagenet/splits/ravi. Setting it makes "csv" the default split.
    splits_dir: str | None = None
    split_seed: int = 0
    train_rotations: bool = False  # add 90/180/270 rotations of train classes as new classes
    cache_dir: str = ".fewshot-cache"
    min_images_per_class: int = Field(2, ge=1)
    first_level: Literal["domain", "subset"] = "domain"  # image folders: root/<domain>/<class> or root/<subset>/<class>
    # split "lake": validation characters held out from each of the 30 background alphabets
    # (seeded); every alphabet stays in training. 0 = no validation split (train on all 964).
    lake_val_fraction: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = dict(DATASET_DEFAULTS.get(str(data.get("dataset")), {}))
        if data.get("splits_dir") is not None:
            defaults.setdefault("split", "csv")
        return {**defaults, **data}

    @model_validator(mode="after")
    def _check_split_files(self) -> DataConfig:
        if self.split == "csv" and self.splits_dir is None and self.dataset not in DATASET_DEFAULTS:
            raise ValueError(f"split 'csv' reads train.csv / val.csv / test.csv from data.splits_dir, which is not "
                             f"set for dataset {self.dataset!r}; set splits_dir to that folder")
        return self

    @model_validator(mode="after")
    def _check_preprocessing(self) -> DataConfig:
        try:
            Preprocessing(self.mode, self.image_size, crop=self.crop, mean=_tuple(self.mean), std=_tuple(self.std))
        except ImageError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def data_root(self) -> Path:
        root = self.root or os.environ.get("FEWSHOT_DATA")
        if not root:
            raise ConfigError(
                "no data root: set data.root in the config, pass --data DIR, or set FEWSHOT_DATA "
                "(for example FEWSHOT_DATA=../shared/datasets)"
            )
        return Path(root).expanduser()


class ModelConfig(_Frozen):
    backbone: str = "conv4"
    backbone_args: dict[str, Any] = Field(default_factory=dict)
    learner: str = "protonet"
    learner_args: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Frozen):
    steps: int = Field(2000, ge=1)
    way: int = Field(20, ge=2)
    shot: int = Field(5, ge=1)
    query: int = Field(15, ge=1)
    meta_batch: int = Field(1, ge=1)
    batch_size: int = Field(128, ge=1)  # for learners that pre-train on batches
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "step", "cosine"] = "step"
    step_every: int = Field(2000, ge=1)  # for the step schedule: halve the lr every N steps
    warmup: int = Field(0, ge=0)
    val_every: int = Field(250, ge=1)
    val_episodes: int = Field(200, ge=1)
    val_way: int = Field(5, ge=2)
    val_shot: int = Field(1, ge=1)
    val_query: int = Field(15, ge=1)
    checkpoint_every: int = Field(250, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = Field(0, ge=0)
    crop_pad: int = Field(0, ge=0)
    hflip: bool = False
    # random resized crop (torchvision's RandomResizedCrop): area fraction range, e.g. [0.08, 1.0]; None: off
    rrc_scale: tuple[float, float] | None = None
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect-ratio (w / h) range
    color_jitter: float = Field(0.0, ge=0, lt=1)  # brightness / contrast / saturation in [1 - v, 1 + v]; RGB only
    hue_jitter: float = Field(0.0, ge=0, le=0.5)  # hue rotation of up to +-v turns; RGB only
    domain_mode: Literal["any", "within", "across"] = "any"
    max_seconds: float | None = Field(None, gt=0)  # stop early (validate, checkpoint) after this wall time
    accumulate: int = Field(1, ge=1)  # backpropagate the batch in this many parts (same gradient for episodes)
    grad_clip: float | None = Field(None, gt=0)  # clip the global gradient norm to this value

    @model_validator(mode="after")
    def _check_crop_ranges(self) -> TrainConfig:
        if self.rrc_scale is not None and not 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1:
            raise ValueError(f"rrc_scale {list(self.rrc_scale)} must be [low, high] with 0 < low <= high <= 1, "
                             "e.g. [0.08, 1.0]")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"rrc_ratio {list(self.rrc_ratio)} must be [low, high] with 0 < low <= high, "
                             "e.g. [0.75, 1.333]")
        return self


class EvalConfig(_Frozen):
    episodes: int = Field(1000, ge=600)  # the protocol's minimum
    way: int = Field(5, ge=2)
    shot: int = Field(1, ge=1)
    query: int = Field(15, ge=1)
    seed: int = 1234
    split: str = "test"
    domain_mode: Literal["any", "within", "across"] = "any"


class ExportConfig(_Frozen):
    enabled: bool = True
    calibration_episodes: int = Field(600, ge=10)
    # no longer read: it chose the legacy raw-score thresholds, which are gone (the open-set rule is
    # calibrated by fewshot.artifacts.calibration); kept so saved run configs that set it still load
    false_accept_rate: float = Field(0.05, gt=0, lt=1)
    # `fewshot export` measures the bundle as served (ONNX Runtime + the service's rule) on the
    # run's test episodes and refuses it when it is more than this below the learner (unless forced)
    max_drop: float = Field(0.01, ge=0, le=1)
    bn_episodes: int = Field(200, ge=1)  # training support sets that re-estimate batch-norm statistics


class TeacherConfig(_Frozen):
    path: str  # a run folder (made by `fewshot train` / `fewshot distill`), a bundle folder, or zoo:NAME
    weight: float = Field(1.0, ge=0)  # this teacher's share of every distillation term


class DistillConfig(_Frozen):
    """Distillation terms added to the student learner's own loss (see fewshot.distill.losses).

    loss = task_weight * task + sum over teachers t of weight_t * (
        kd_episode_weight * KD(episode logits) + kd_class_weight * KD(base-class logits)
        + hint_weight * FitNets hint + rkd_distance_weight * RKD-D + rkd_angle_weight * RKD-A)
    """
    teachers: list[TeacherConfig] = Field(min_length=1)
    task_weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)
    kd_episode_weight: float = Field(1.0, ge=0)
    kd_class_weight: float = Field(0.0, ge=0)
    hint_weight: float = Field(0.0, ge=0)
    rkd_distance_weight: float = Field(0.0, ge=0)
    rkd_angle_weight: float = Field(0.0, ge=0)
    # born-again generations: generation g + 1 is taught by generation g (the first by `teachers`)
    generations: int = Field(1, ge=1, le=10)
    # also train the same student alone with the same budget, for the report (`<name>-alone`)
    baseline: bool = True


class PipelineConfig(_Frozen):
    # `fewshot pipeline`: a distill config whose student is taught by the run just trained
    # (its teachers are replaced by that run); None skips the distillation stage
    distill: str | None = None
    # a zoo entry (name) whose bundle the service check also runs on, beside the model just trained
    zoo_compare: str | None = None


class ZooResult(_Frozen):
    """One row of a zoo card's table: a task, and the published number it is compared with."""
    way: int = Field(ge=2)
    shot: int = Field(ge=1)
    mode: Literal["any", "within", "across"] = "any"
    published: float | None = Field(None, ge=0, le=100)  # accuracy in percent
    source: str | None = None  # where the published number comes from


class ZooConfig(_Frozen):
    """A zoo recipe's card (`fewshot zoo publish CONFIG`): what the entry is, what it is for, and the
    protocol and published anchors of its accuracy table. Not part of what a run computes: a resume
    never compares it."""
    title: str
    summary: str
    intended_use: str
    limitations: str
    data_description: str
    licence: str
    results: list[ZooResult] = Field(min_length=1)
    episodes: int = Field(1000, ge=600)
    query: int = Field(15, ge=1)
    seed: int = 1234
    split: str = "test"


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
              "train.val_shot", "train.val_query", "data.split", "data.splits_dir", "data.split_seed",
              "data.root", "data.dataset", "data.lake_val_fraction", "data.min_images_per_class", "data.first_level",
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
    import types
    import typing

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


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested dict."""
    out = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.steps=500)")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown field {loc!r}: remove it or fix its spelling")
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; see configs/ for examples")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {p} must be a YAML mapping, got {type(loaded).__name__}")
        data, source = loaded, str(p)
    return config_from_dict(apply_overrides(data, overrides or []), source)


def dump_config(config: RunConfig, path: Path) -> None:
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
