"""Training, evaluation, checkpoints and distributed setup for convnn models."""

from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from .config import Config, ConfigError, load_config, save_config, valid_keys
from .runner import evaluate_path, run_training, train_seeds

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "evaluate_path",
    "load_checkpoint",
    "load_config",
    "load_weights",
    "run_training",
    "save_checkpoint",
    "save_config",
    "train_seeds",
    "valid_keys",
]
