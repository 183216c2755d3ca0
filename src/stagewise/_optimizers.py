"""The optimizers known by name: one table that training builds from and the planner times and sizes."""

from __future__ import annotations

import torch

__all__ = ["OPTIMIZERS", "OPTIMIZER_CLASSES"]

OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
"""The optimizers known by name (any other is a dotted path)."""
OPTIMIZERS = tuple(OPTIMIZER_CLASSES)
