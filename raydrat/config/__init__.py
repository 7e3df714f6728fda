"""Layer 1, the schemas: every raydrat setting, typed and validated once.

One pydantic model per component, ``extra="forbid"``, each field documented where it is
declared: ``model`` (:mod:`raydrat.config.model`, beside the model), ``data``,
``optim``, ``train``, one section per technique (``precision``, ``compile``,
``recompute``, ``slots``, ``sync``), ``scaling``, ``tracking``, and ``SweepConfig`` for
``tune_spaces/*.yaml``. These modules import nothing of raydrat but
each other; a check that needs a model or a machine lives in
:func:`raydrat.core.runtime.resolve`, not here.

``load_config(path, overrides)`` reads a YAML recipe, applies ``--set a.b=c`` overrides
and returns a validated :class:`RaydratConfig`; any problem raises :class:`ConfigError`
whose message names the key and what to do. This package is the only place defaults live.
"""

from raydrat.config.base import ConfigError, Section
from raydrat.config.compile import CompileConfig
from raydrat.config.data import DataConfig, SourceConfig
from raydrat.config.dotted import flatten, parse_override, set_dotted
from raydrat.config.loading import (
    RECIPES_DIR,
    config_from_dict,
    format_validation_error,
    load_config,
    read_config_mapping,
    read_yaml_mapping,
    renamed_key,
    resolve_recipe,
    resolve_shipped_yaml,
    upgrade_flat,
)
from raydrat.config.model import ModelConfig
from raydrat.config.optim import OptimConfig
from raydrat.config.precision import PrecisionConfig
from raydrat.config.recompute import GatesConfig, RecomputeConfig
from raydrat.config.run import RaydratConfig
from raydrat.config.scaling import ScalingConfig
from raydrat.config.slots import SlotsConfig
from raydrat.config.sweep import SchedulerConfig, SweepConfig, TrialResourcesConfig
from raydrat.config.sync import SyncConfig
from raydrat.config.tracking import TrackingConfig
from raydrat.config.train import TrainConfig

__all__ = [
    "RECIPES_DIR",
    "CompileConfig",
    "ConfigError",
    "DataConfig",
    "GatesConfig",
    "ModelConfig",
    "OptimConfig",
    "PrecisionConfig",
    "RaydratConfig",
    "RecomputeConfig",
    "SchedulerConfig",
    "ScalingConfig",
    "Section",
    "SlotsConfig",
    "SourceConfig",
    "SweepConfig",
    "SyncConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrialResourcesConfig",
    "config_from_dict",
    "flatten",
    "format_validation_error",
    "load_config",
    "parse_override",
    "read_config_mapping",
    "read_yaml_mapping",
    "renamed_key",
    "resolve_recipe",
    "resolve_shipped_yaml",
    "set_dotted",
    "upgrade_flat",
]
