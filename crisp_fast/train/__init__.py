"""The CRISP trainer: `train(config) -> TrainResult`, `Trainer` (with `train_step` and
`train_on_rollouts` for benchmarks), and the typed configuration."""
from crisp_fast.train.config import Config, ConfigError, load_config
from crisp_fast.train.loop import Trainer, TrainResult, train

__all__ = ["Config", "ConfigError", "load_config", "Trainer", "TrainResult", "train"]
