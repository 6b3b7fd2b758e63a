"""Run configuration: typed frozen sections (`schema`), YAML presets with dotted overrides (`loading`),
and every rule a config must satisfy (`checks`)."""

from jaxrl_llm.config.loading import (
    changed_fields,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate,
)
from jaxrl_llm.config.schema import (
    Config,
    DataSection,
    DPOSection,
    GRPOSection,
    LoggingSection,
    MeshSection,
    ModelSection,
    OptimSection,
    PPOSection,
    RMSection,
    SamplingSection,
    SyntheticSection,
    TinyModel,
    TrainSection,
)
from jaxrl_llm.errors import ConfigError

__all__ = [
    "Config", "ConfigError", "DPOSection", "DataSection", "GRPOSection", "LoggingSection", "MeshSection",
    "ModelSection", "OptimSection", "PPOSection", "RMSection", "SamplingSection", "SyntheticSection",
    "TinyModel", "TrainSection", "changed_fields", "config_from_dict", "config_to_dict", "load_config",
    "save_config", "validate",
]
