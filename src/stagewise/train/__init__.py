"""Pipeline-parallel and hybrid (data x pipeline) training across processes."""

from ._config import (
    OPTIMIZERS,
    DataConfig,
    LayoutConfig,
    OptimConfig,
    OutputConfig,
    RuntimeConfig,
    SplitConfig,
    TrainConfig,
)
from ._reference import train_reference
from ._trainer import Trainer, TrainResult

__all__ = [
    "OPTIMIZERS",
    "DataConfig",
    "LayoutConfig",
    "OptimConfig",
    "OutputConfig",
    "RuntimeConfig",
    "SplitConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "train_reference",
]
