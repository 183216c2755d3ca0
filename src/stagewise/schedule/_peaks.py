"""Peak in-flight activations: how many microbatches a stage holds at once under a schedule (the memory count).

:func:`peak_activations` counts them on any :class:`Schedule`; for a builder's schedule it also answers from the name
and sizes in closed form, since the planner asks for hundreds of layouts and building big schedules is slow (a test
pins the two equal).
"""

from __future__ import annotations

import functools

import numpy as np

from ._actions import Schedule
from ._builders import SCHEDULE_NAMES, ScheduleName

__all__ = ["peak_activations"]


def peak_activations(schedule: Schedule | ScheduleName, *, ranks: int | None = None, microbatches: int | None = None,
                     stages_per_rank: int = 1) -> dict[int, int]:
    """Stage -> the most microbatches whose F has run but whose B (or I) has not, at any point of its rank's list.

    GPipe keeps all M; 1F1B and ZB keep ``min(M, P - stage)``. (A W needs only what its I kept, so it is not
    counted.) ``schedule`` is a :class:`Schedule`, or a builder name with ``ranks`` and ``microbatches`` (and
    ``stages_per_rank``) for what ``build(name, ...)`` would make, computed without building it.
    """
    if isinstance(schedule, Schedule):
        return _counted(schedule)
    if ranks is None or microbatches is None:
        raise ValueError("peak_activations of a schedule name needs ranks= and microbatches=")
    peaks = _closed_form(schedule, ranks, microbatches, stages_per_rank)
    return dict(enumerate(peaks))


def _counted(schedule: Schedule) -> dict[int, int]:
    live = dict.fromkeys(range(schedule.stages), 0)
    peak = dict.fromkeys(range(schedule.stages), 0)
    for actions in schedule.actions.values():
        for action in actions:
            if action.stage not in live:
                continue  # out of range; validate() reports it
            if action.kind == "F":
                live[action.stage] += 1
                peak[action.stage] = max(peak[action.stage], live[action.stage])
            elif action.kind in ("B", "I"):
                live[action.stage] -= 1
    return peak


def _closed_form(name: str, P: int, M: int, V: int) -> list[int]:
    """GPipe: M; 1F1B and ZB: ``min(M, P - s)``; interleaved: counted from its 1F1B order."""
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if name != "interleaved" and V != 1:
        raise ValueError(f"stages_per_rank={V} needs the 'interleaved' schedule; {name!r} runs one stage per rank")
    if name == "gpipe":
        return [M] * P
    if name in ("1f1b", "zb") or V == 1:
        return [min(M, P - s) for s in range(P)]
    return list(_interleaved_peaks(P, V, _saturated(P, V, M)))


def _saturated(P: int, V: int, M: int) -> int:
    """M, or a smaller multiple of P with the same interleaved peaks: once every rank's steady phase lasts a whole
    period (``M * V >= warmup + P * V``), the peaks no longer depend on M."""
    need = (V - 1) * P + 2 * (P - 1) + P * V
    if M * V < need or M % P:
        return M
    return -(-need // (V * P)) * P


@functools.lru_cache(maxsize=1024)
def _interleaved_peaks(P: int, V: int, M: int) -> tuple[int, ...]:
    # Rank r runs w warmup forwards, then (F, B) pairs, then backwards, over T = M * V work items; forward item k runs
    # chunk (k % PV) // P, backward item k chunk V - 1 - (k % PV) // P. Live count after F item f and B item b is
    # F_c(f) - B_c(b), periodic in (f, b) -> (f + PV, b + PV), so one period of the steady phase suffices.
    T, PV = M * V, P * V
    r = np.arange(P)[:, None]  # (P, 1)
    w = np.minimum((V - 1) * P + 2 * (P - 1 - r), T)  # warmup forwards of each rank
    i = np.arange(PV)[None, :]  # (1, PV): one period of the steady phase
    valid = i < np.minimum(T - w, PV)
    peaks = np.zeros(PV, dtype=np.int64)
    for c in range(V):
        f = w + i + 1  # forwards run after the (i+1)-th steady-phase forward
        alive = ((f // PV) * P + np.clip(f % PV - c * P, 0, P)) - ((i // PV) * P + np.clip(i % PV - (V - 1 - c) * P,
                                                                                             0, P))
        steady = np.where(valid, alive, np.iinfo(np.int64).min).max(axis=1)
        only_warmup = w[:, 0] >= T  # all forwards first: every microbatch of the chunk is alive at once
        peaks[c * P: (c + 1) * P] = np.where(only_warmup, M, steady)
    return tuple(int(x) for x in peaks)
