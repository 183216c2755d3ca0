"""Stagewise: split one large PyTorch model into stages, train it across processes, and serve it."""

from ._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [*lazy_exports(__name__, {
    "ConfigError": "._errors",
    "load_model_spec": "._spec",
    "ModelSpec": "._spec",
    "Partition": ".split",
    "split": ".split",
    "SplitError": ".split",
    "SplitModel": ".split",
    "Stage": ".split",
    "StageSpec": ".split",
    "StagewiseError": "._errors",
    "train_reference": ".train",
    "TrainConfig": ".train",
    "Trainer": ".train",
    "TrainResult": ".train",
}), "__version__"]
