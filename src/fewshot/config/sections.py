"""The sections of a run config: data, model, train, eval, export, distill, pipeline, zoo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from fewshot.data.imageio import Preprocessing
from fewshot.errors import ConfigError, ImageError


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
    # (seeded); every alphabet stays in training unless lake_val_alphabets (below) holds some out.
    # 0 = no validation split (train on all 964).
    lake_val_fraction: float = Field(0.1, ge=0, lt=1)
    # split "lake": also hold out this many whole background alphabets (seeded, 20+ characters each)
    # as val, for choosing a recipe on within-alphabet episodes of unseen alphabets (0: none). With
    # lake_val_fraction > 0 too, the other alphabets' held-out characters are val as well, and
    # within-alphabet val episodes small enough for them draw from those seen alphabets too: set the
    # fraction to 0 to validate on unseen alphabets only.
    lake_val_alphabets: int = Field(0, ge=0, le=29)

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
    val_domain_mode: Literal["any", "within", "across"] = "any"  # how validation episodes draw classes
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
    affine: bool = False  # Koch et al. 2015's random affine distortions (fewshot.episodes.materialise.random_affine)
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
    # the views of a taught image averaged into its class's embedding (fewshot.decision.views):
    # "auto" keeps, of the candidates whose paired gain over no views on `view_episodes` validation
    # episodes of the eval shape and domain mode is above its 95% interval, the largest (none
    # otherwise); or name one
    views: Literal["auto", "none", "mirror", "shift4", "shift4+mirror"] = "auto"
    view_episodes: int = Field(300, ge=10)
    # a probe head's regularisation C (fewshot.artifacts.served_choice.choose_probe_c): None keeps the
    # learner's; a number serves that C; "auto" keeps, of the learner's C and 2, 4 and 8 times it, the
    # one with the largest paired gain over the learner's on `view_episodes` validation episodes at
    # each shot of `probe_c_shots` (the eval shot when empty), above its 95% interval and
    # significantly worse at no shot (the learner's otherwise)
    probe_c: Literal["auto"] | PositiveFloat | None = None
    probe_c_shots: list[PositiveInt] = Field(default_factory=list, max_length=4)


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
