"""Run configuration: typed sections loaded strictly from YAML."""

from sbtrain.config.errors import ConfigError
from sbtrain.config.load import dump_config, load_config, stage_names
from sbtrain.config.schema import (
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    ProfilerConfig,
    RunConfig,
    SpikingConfig,
    TrainConfig,
    parse_pattern,
)
from sbtrain.config.validate import validate

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "ModelConfig", "MoEConfig", "OptimConfig",
    "ParallelConfig", "ProfilerConfig", "RunConfig", "SpikingConfig", "TrainConfig", "dump_config", "load_config",
    "parse_pattern", "stage_names", "validate",
]
