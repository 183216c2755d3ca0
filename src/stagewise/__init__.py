"""Stagewise: split one large PyTorch model into stages, train it across processes, and serve it."""

from ._errors import ConfigError, StagewiseError
from ._spec import ModelSpec, load_model_spec
from .split import Partition, SplitError, SplitModel, Stage, StageSpec, split
from .train import TrainConfig, Trainer, TrainResult, train_reference

__version__ = "0.1.0"

__all__ = [
           "ConfigError",
           "ModelSpec",
           "Partition",
           "SplitError",
           "SplitModel",
           "Stage",
           "StageSpec",
           "StagewiseError",
           "TrainConfig",
           "TrainResult",
           "Trainer",
           "__version__",
           "load_model_spec",
           "split",
           "train_reference",
]
