"""Why no layout fits, and the smallest change that would make one fit (the text of a :class:`PlanError`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..schedule import peak_activations
from ..split import UnitInfo
from ._cut import capped_min_max_cuts, stage_memory

__all__ = ["explain_no_fit"]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB" if n >= 2**18 else f"{n:.0f} B"


@dataclasses.dataclass(frozen=True)
class _Failed:
    """What the search tried: ``weight`` and ``cap`` are scaled by ``prof`` (the profile's rows), as in the search."""

    mode: str
    N: int
    cap: int
    G: int
    units: Sequence[UnitInfo]
    time_ms: Sequence[float]
    weight: Sequence[int]
    prof: int
    rejected: int

    @property
    def n(self) -> int:
        return len(self.units)


def _live(mode: str, P: int, microbatches: int) -> list[int]:
    """Microbatches alive per stage at the least memory: one (serving) or 1F1B's peaks."""
    if mode == "serve":
        return [1] * P
    return list(peak_activations("1f1b", ranks=P, microbatches=microbatches).values())


def _least_memory_fits(s: _Failed, P: int, microbatches: int) -> bool:
    """Whether P stages fit at their least memory: 1-row microbatches under 1F1B (or serving)."""
    act = [u.out_bytes for u in s.units]  # one row
    return capped_min_max_cuts(s.time_ms, P, weight=s.weight, act=act, live=_live(s.mode, P, microbatches),
                               cap=s.cap * s.prof) is not None


def explain_no_fit(*, mode: str, devices: int, cap: int, global_batch: int, units: Sequence[UnitInfo],
                   time_ms: Sequence[float], weight: Sequence[int], profile_batch: int, rejected: int) -> str:
    """The :class:`PlanError` text for a search over ``devices`` devices of ``cap`` bytes that found no layout."""
    s = _Failed(mode, devices, cap, global_batch, units, time_ms, weight, profile_batch, rejected)
    head = (f"no {s.mode} layout of {s.N} device(s) fits in {_gib(s.cap)} per device (global batch {s.G}, "
            f"{s.n} units; {s.rejected} layout(s) were over the memory cap)")
    # 1. A layout of these devices fits at 1-row microbatches, but the batch does not split over its replicas.
    batch_fixes = []
    for P in range(1, min(s.N, s.n) + 1):
        D = s.N // P
        if s.N % P or not _least_memory_fits(s, P, max(1, s.G // D)):
            continue
        if s.G % D == 0:
            return (f"{head}; {P} stage(s) x {D} replica(s) would fit with 1-row microbatches under the 1f1b "
                    "schedule, which was not among the schedules tried: allow '1f1b'")
        for batch in (-(-s.G // D) * D, s.G // D * D):
            if batch >= D:
                batch_fixes.append((abs(batch - s.G), batch, P, D))
    if batch_fixes:
        _, batch, P, D = min(batch_fixes)
        return (f"{head}; smallest change: use --global-batch {batch} (a multiple of the {D} replicas of "
                f"{P} stage(s) x {D} replica(s), which fits)")
    # 2. More (or a different number of) pipeline stages would fit.
    for P in range(1, s.n + 1):
        if _least_memory_fits(s, P, s.G):
            more = "at least " if P > s.N else ""
            return (f"{head}; smallest change: use {more}{P} device(s) as {P} pipeline stages (--devices {P}"
                    f"{' and a cluster file listing them' if P > s.N else ''}), with small microbatches")
    # 3. Not even one unit per stage fits: the devices need more memory.
    needs = stage_memory(s.weight, [u.out_bytes for u in s.units], list(range(s.n)), _live(s.mode, s.n, s.G))
    worst = max(range(s.n), key=lambda j: needs[j])
    need = -(-needs[worst] // s.prof)
    return (f"{head}; even one unit per stage does not fit: unit {s.units[worst].name!r} needs {_gib(need)} "
            f"(parameters{', gradients, optimizer state' if s.mode == 'train' else ''} and 1-row activations); "
            f"smallest change: devices with at least {_gib(need)} of memory")
