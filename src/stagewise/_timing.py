"""Timing on this process: the one way Stagewise times a piece of work, and the thread count it is timed with.

Every profile (units at split time, the planner's chain, loss and data loading, the link probe) times a call the same
way: ``warmup`` untimed runs, then the median of ``repeats`` timed ones; a median ignores the odd run that another
process on the machine slowed down. The compute threads are set for the duration and restored after, since a
multi-threaded tiny op on a busy machine can take 100x longer while OpenMP threads spin.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

__all__ = ["median_ms", "num_threads"]

T = TypeVar("T")


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch compute threads, then restore the previous count (also on error)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"threads must be an int >= 1, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_ms(forward: Callable[[], T], backward: Callable[[T], Any] | None = None, *, repeats: int,
              warmup: int = 1) -> tuple[float, float]:
    """Milliseconds of ``forward()`` and of ``backward(its result)`` (0 without one): the median of ``repeats`` runs
    after ``warmup`` untimed ones. Each run calls ``forward`` and then ``backward`` on what it returned."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    fwd: list[float] = []
    bwd: list[float] = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        result = forward()
        mid = time.perf_counter()
        if backward is not None:
            backward(result)
        end = time.perf_counter()
        if i >= warmup:
            fwd.append((mid - start) * 1e3)
            bwd.append((end - mid) * 1e3)
    return statistics.median(fwd), statistics.median(bwd) if backward is not None else 0.0
