"""What a training rank measures of its own memory, to check the planner's prediction against (#12).

Measured on the run's first step, in the categories of :class:`stagewise.plan.Plan`'s memory:

- ``weights``: bytes of the parameters and buffers of the rank's stages (each storage once);
- ``gradients``: bytes of the gradients its parameters hold after the pipeline (before the update frees them);
- ``optimizer``: bytes of the optimizer state after the update (Adam's moments are made by the first step);
- ``activations``: the most bytes of tensors autograd held saved for backward at any moment of the pipeline and the
  loss (:class:`stagewise.split.SavedBytes`, as the unit profiler counts them).

Only the first step is measured, so the hooks' cost is paid once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["MEMORY_KINDS", "storage_bytes"]

MEMORY_KINDS = ("weights", "gradients", "optimizer", "activations")
"""The categories a rank reports, in this order."""


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (non-tensors and meta tensors skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
