"""Keep freed memory in the process: glibc's defaults hand large blocks back to the kernel at every free.

A training or serving step allocates and frees the same large tensors (weight gradients, optimizer temporaries,
activations) every microbatch. With glibc's defaults, blocks over the mmap threshold are unmapped on free and the heap
top is trimmed, so each step page-faults its memory in again: measured here, one stage of 4 x Linear(1024, 1024) at
microbatch 8 spends B 10.0 ms -> 8.3 ms and Adam 19 ms -> 15 ms once blocks stay mapped. Worker processes call
:func:`tune_allocator` at start; the planner's profiling does too, so its predictions match what workers measure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

__all__ = ["tune_allocator"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc <malloc.h>
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum: blocks up to 32 MiB come from the heap and are reused
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of free heap top instead of returning it at every free
_TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps


@functools.cache
def tune_allocator() -> bool:
    """Set glibc malloc to keep freed blocks mapped (once per process); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt...): keep its defaults
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    log.debug("malloc tuned: %s", ok)
    return ok
