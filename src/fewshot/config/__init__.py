"""Typed, frozen, validated configuration: YAML is data, command-line overrides are `a.b=value`.

A wrong field is named with the fix (pydantic's `extra="forbid"`), values are checked on load,
and the resolved config is echoed into the run folder so a run always says how it was made.
"""

from fewshot.config.loading import config_from_dict, dump_config, load_config
from fewshot.config.run import ParamSpec, RunConfig, TuneConfig
from fewshot.config.sections import DataConfig, DistillConfig, EvalConfig, TrainConfig, ZooConfig

# The names the rest of the code base imports from here; the others live in fewshot.config.sections
# (DATASET_DEFAULTS, ModelConfig, TeacherConfig, ExportConfig, PipelineConfig, ZooResult) and .loading (apply_overrides).
__all__ = [
    "DataConfig", "DistillConfig", "EvalConfig", "ParamSpec", "RunConfig", "TrainConfig",
    "TuneConfig", "ZooConfig", "config_from_dict", "dump_config", "load_config",
]
