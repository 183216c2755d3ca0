"""Pipeline-parallel and hybrid (data x pipeline) training across processes."""

from ._config import OPTIMIZERS, SCHEDULES, TrainConfig
from ._data import sample_to_call
from ._reference import train_reference
from ._trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "Trainer", "TrainResult", "train_reference", "SCHEDULES", "OPTIMIZERS",
           "sample_to_call"]
