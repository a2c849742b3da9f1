"""Training, evaluation, checkpoints and distributed setup for convnn models.

Names load on first use: :mod:`convnn.train.config` (recipes and their checks) is read by
``convnn train --help`` without importing torch.
"""

from typing import TYPE_CHECKING

from ..utils import lazy_exports

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "evaluate_path",
    "load_checkpoint",
    "load_config",
    "load_trained_model",
    "load_weights",
    "run_training",
    "save_checkpoint",
    "save_config",
    "train_seeds",
    "valid_keys",
]

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CheckpointError": ".checkpoint",
        "load_checkpoint": ".checkpoint",
        "load_weights": ".checkpoint",
        "save_checkpoint": ".checkpoint",
        "Config": ".config",
        "ConfigError": ".config",
        "load_config": ".config",
        "save_config": ".config",
        "valid_keys": ".config",
        "evaluate_path": ".loading",
        "load_trained_model": ".loading",
        "run_training": ".runner",
        "train_seeds": ".seeds",
    },
)

if TYPE_CHECKING:
    from .checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
    from .config import Config, ConfigError, load_config, save_config, valid_keys
    from .loading import evaluate_path, load_trained_model
    from .runner import run_training
    from .seeds import train_seeds
