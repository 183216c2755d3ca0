"""The optimizers known by name: one table that training builds from and the planner times and sizes.

The names are plain strings so that the command line offers them without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIMIZERS", "optimizer_class"]

OPTIMIZERS = ("adam", "adamw", "sgd")
"""The optimizers known by name (any other is a dotted path)."""


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` class of the known optimizer ``name`` (one of :data:`OPTIMIZERS`)."""
    import torch

    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
