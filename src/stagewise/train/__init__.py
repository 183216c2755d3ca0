"""Pipeline-parallel and hybrid (data x pipeline) training across processes."""

from .._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "DataConfig": "._config",
    "LayoutConfig": "._config",
    "OptimConfig": "._config",
    "OPTIMIZERS": "._config",
    "OutputConfig": "._config",
    "PlanCheck": "._plan_check",
    "RecoveryConfig": "._config",
    "RuntimeConfig": "._config",
    "SplitConfig": "._config",
    "StartConfig": "._config",
    "train_reference": "._reference",
    "TrainConfig": "._config",
    "Trainer": "._trainer",
    "TrainResult": "._trainer",
    "verify_plans": "._verify",
})
