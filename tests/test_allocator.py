"""The worker allocator setting: freed large blocks stay mapped, so a step does not page-fault its memory in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CHURN = """
import resource, sys, torch
from stagewise._allocator import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator() is True and tune_allocator() is True  # idempotent
else:  # glibc's static defaults, pinned (left alone, its dynamic threshold makes the churn depend on history)
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 128 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1  # M_MMAP_/M_TRIM_THRESHOLD
for i in range(14):  # what a step does with gradients and optimizer temporaries: allocate, fill, free them all
    if i == 4:  # after warm-up: the heap has grown to a step's size
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step = [torch.empty(1 << 20) for _ in range(8)] + [torch.empty(4 << 20)]  # 8 x 4 MiB + 16 MiB
    for t in step:
        t.fill_(1.0)
    del step, t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_tuned_allocator_stops_page_faults_on_reallocation() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _CHURN, mode], capture_output=True, text=True, timeout=60,
                             check=True)
        return int(out.stdout.strip())

    default, tuned = faults("default"), faults("tuned")
    assert default > 10 * 4096, f"glibc's default thresholds should fault a step's 48 MiB in again ({default} faults)"
    assert tuned < default / 10, f"tuned allocator still faults: {tuned} vs {default} by default"
