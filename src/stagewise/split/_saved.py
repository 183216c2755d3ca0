"""Bytes autograd holds saved for backward: what a unit, a stage or a training step keeps per microbatch.

:class:`SavedBytes` counts with ``torch.autograd.graph.saved_tensors_hooks``: a storage counts once however many graph
nodes save it (a ReLU output is saved by the ReLU and by the next Linear), is released when the last graph node that
saved it is freed, and parameters (and views of them) are not counted. The unit profiler measures each unit with it;
training ranks measure their peak with it (:mod:`stagewise.train`), so prediction and measurement count alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["SavedBytes"]


class SavedBytes:
    """Live bytes of the tensors autograd saved for backward (each storage once; ``params`` excluded) and their peak."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.param_storages = {p.untyped_storage().data_ptr() for p in params}
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, packed references]
        self.live = 0
        self.peak = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        """Count what autograd saves while the block runs."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self

    def pack(self, t: torch.Tensor) -> Any:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.param_storages or ptr == 0:
            return t
        entry = self.refs.get(ptr)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self.refs[ptr] = [nbytes, 1]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        else:
            entry[1] += 1
        return _Packed(t, ptr, self)

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        return obj.tensor if isinstance(obj, _Packed) else obj

    def release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[ptr]


class _Packed:
    """What the pack hook hands autograd; freed (and un-counted) when the graph node that saved it goes away."""

    __slots__ = ("tensor", "ptr", "meter")

    def __init__(self, tensor: torch.Tensor, ptr: int, meter: SavedBytes) -> None:
        self.tensor, self.ptr, self.meter = tensor, ptr, meter

    def __del__(self) -> None:
        self.meter.release(self.ptr)
