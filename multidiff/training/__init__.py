"""Training: the denoising loss, configs, the trainer, checkpoints, EMA and distributed helpers."""
from .checkpoint import (
    FORMAT_VERSION,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFallbackWarning,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    LoadedCheckpoint,
    export_checkpoint,
    latest_checkpoint,
    load_checkpoint,
)
from .config import ConfigError, EMAConfig, OptimConfig, RunConfig, TrainConfig, apply_overrides, load_config, save_config
from .distributed import generate_sharded, init_distributed, merge_shards, unwrap_model
from .ema import EMA
from .loss import TIME_SAMPLINGS, WEIGHTINGS, DenoisingLoss, LossHistory, LossOutput, sensitivity2
from .trainer import FitResult, NonFiniteLossError, Trainer

__all__ = [
    "DenoisingLoss", "LossOutput", "LossHistory", "WEIGHTINGS", "TIME_SAMPLINGS", "sensitivity2",
    "TrainConfig", "OptimConfig", "EMAConfig", "RunConfig", "ConfigError", "load_config", "save_config", "apply_overrides",
    "Trainer", "FitResult", "NonFiniteLossError", "EMA",
    "load_checkpoint", "latest_checkpoint", "export_checkpoint", "LoadedCheckpoint", "FORMAT_VERSION",
    "CheckpointError", "CheckpointNotFoundError", "CheckpointCorruptError", "CheckpointMismatchError",
    "CheckpointVersionError", "CheckpointFallbackWarning",
    "init_distributed", "unwrap_model", "generate_sharded", "merge_shards",
]
