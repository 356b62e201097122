"""Recipes: a typed dataclass tree, loaded from YAML with `--set` overrides and validated.

This module is the one place where every recipe key, its default and its meaning are written down
(`accelvit defaults` prints them as a commented YAML recipe). Validation happens here, before any
file is written, and every problem is reported as one `ConfigError` line naming the key and value.

The package by concern: `schema` (the dataclasses, defaults and meanings), `loading` (YAML, includes,
overrides, the launcher's settings), `coercion` (values into types), `validation` (what a typed
recipe must satisfy) and `describe` (a recipe written back out, and `accelvit defaults`).
"""

from accelvit.config.coercion import from_dict
from accelvit.config.describe import changed_keys, defaults_markdown, describe_defaults, dump_config, to_dict
from accelvit.config.loading import apply_override, load_config, read_yaml
from accelvit.config.schema import (
    COMPILE_KEEP_BUCKETS,
    DATASETS,
    SHAPES,
    Config,
    ConfigError,
    CostConfig,
    DataConfig,
    Dataset,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    ObjectiveName,
    OptimConfig,
    RampConfig,
    ScheduleConfig,
    Shape,
    Tracker,
    TrainConfig,
)
from accelvit.config.validation import patch_sizes, validate

__all__ = [
    "COMPILE_KEEP_BUCKETS", "DATASETS", "SHAPES", "Config", "ConfigError", "CostConfig", "DataConfig",
    "Dataset", "EvalConfig", "ModelConfig", "ObjectiveConfig", "ObjectiveName", "OptimConfig",
    "RampConfig", "ScheduleConfig", "Shape", "Tracker", "TrainConfig", "apply_override", "changed_keys",
    "defaults_markdown", "describe_defaults", "dump_config", "from_dict", "load_config", "patch_sizes",
    "read_yaml", "to_dict", "validate",
]  # fmt: skip
