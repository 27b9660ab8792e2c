"""Typed, frozen, validated configuration: YAML is data, command-line overrides are `a.b=value`.

A wrong field is named with the fix (pydantic's `extra="forbid"`), values are checked on load,
and the resolved config is echoed into the run folder so a run always says how it was made.
"""

from fewshot.config.loading import apply_overrides, config_from_dict, dump_config, load_config
from fewshot.config.run import ParamSpec, RunConfig, TuneConfig
from fewshot.config.sections import (
    DATASET_DEFAULTS,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    PipelineConfig,
    TeacherConfig,
    TrainConfig,
    ZooConfig,
    ZooResult,
)

__all__ = [
    "DATASET_DEFAULTS", "DataConfig", "DistillConfig", "EvalConfig", "ExportConfig", "ModelConfig", "ParamSpec",
    "PipelineConfig", "RunConfig", "TeacherConfig", "TrainConfig", "TuneConfig", "ZooConfig", "ZooResult",
    "apply_overrides", "config_from_dict", "dump_config", "load_config",
]
