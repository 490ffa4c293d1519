"""One typed config for a training run.

Built once from: dataclass defaults (the tiny embedded model) < the stage's defaults < a YAML
file (`--config`) < dotted `key=value` overrides. Every section validates itself; an unknown key,
a value of the wrong type, a value outside a field's `Literal` choices (checked while the YAML/CLI
values are read, see `load._coerce`) or a contradictory setting raises `ConfigError` naming the key and
the fix, before any process group starts.

keys.py holds every key (section, type, default, check); load.py reads them from YAML and overrides.
"""
from para_train.config.keys import (
    REPO_ROOT, ConfigError, Stage, PredictionType, CaptionStyle, Crop, UsePrecomputed, LRSchedule,
    Precision, InitWeights, ZeroStage, LoraKernel, CrossAttentionKernel, TINY, ModelPath, ResumeFrom, InitFrom,
    RunConfig, LLMConfig, LoRAConfig, TINY_UNET, UNetConfig, VAEConfig, ModelConfig, StreamConfig, CAPTION_STYLES,
    DataConfig, TrainConfig, CheckpointConfig, DeepSpeedSection, KernelsConfig, TrackingConfig, SampleConfig,
    EvalConfig, DebugConfig, Config, STAGE_DEFAULTS
)
from para_train.config.load import (
    config_from_dict, load_config, parse_override, save_config
)

__all__ = [
    "CAPTION_STYLES", "CaptionStyle", "CheckpointConfig", "Config", "ConfigError", "Crop", "CrossAttentionKernel",
    "DataConfig", "DebugConfig", "DeepSpeedSection", "EvalConfig", "InitFrom", "InitWeights", "KernelsConfig",
    "LLMConfig", "LRSchedule", "LoRAConfig", "LoraKernel", "ModelConfig", "ModelPath", "Precision",
    "PredictionType", "REPO_ROOT", "ResumeFrom", "RunConfig", "STAGE_DEFAULTS", "SampleConfig", "Stage",
    "StreamConfig", "TINY", "TINY_UNET", "TrackingConfig", "TrainConfig", "UNetConfig", "UsePrecomputed",
    "VAEConfig", "ZeroStage", "config_from_dict", "load_config", "parse_override", "save_config"
]
