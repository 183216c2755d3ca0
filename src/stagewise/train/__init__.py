"""Pipeline-parallel and hybrid (data x pipeline) training across processes."""

from ._config import OPTIMIZERS, SCHEDULES, TrainConfig
from ._reference import train_reference
from ._trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "Trainer", "TrainResult", "train_reference", "SCHEDULES", "OPTIMIZERS"]
