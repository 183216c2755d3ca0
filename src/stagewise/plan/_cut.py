"""The exact min-max chain cut under a per-stage memory cap.

Stage ``j`` holding units ``[a, b)`` costs ``time(a, b) = sum(time[a:b])`` and needs memory::

    mem_j(a, b) = sum(weight[a:b]) + live[j] * (act_in(a) + sum(act[a:b]))

``weight`` is what a unit keeps regardless of microbatches (parameters, gradients, optimizer state), ``act[u]`` the
activation bytes unit ``u`` produces per microbatch, ``act_in(a) = act[a - 1]`` what the stage receives (``act_in(0) =
input_act``) and ``live[j]`` how many microbatches stage ``j`` holds at its peak. We want exactly ``stages`` non-empty
stages, each with ``mem_j <= cap``, minimising ``max_j time``.

Why a greedy probe is still exact. Both ``time`` and ``mem_j`` only shrink when a stage loses units at either end
(``act_in(a') + sum(act[a':b]) = sum(act[a'-1:b])`` for ``a' > a``). If the constraints are *nested*, i.e. whatever
fits stage ``j`` also fits every later stage (``live`` non-increasing, as in GPipe, 1F1B, ZB and interleaved 1F1B),
packing from the *last* stage backwards, each stage reaching as far left as the bound, the memory cap and "one unit
left per remaining stage" allow, starts every stage at or before where any feasible cut starts it (induction from the
right; a unit the greedy must put in a stage that an optimal cut puts in an earlier one fits by nesting). So the probe
succeeds iff some cut meets the time bound. ``live`` that is not non-increasing is replaced by its suffix maximum,
which only tightens caps (plans stay safe; optimality then holds for the tightened caps).

The bound is bisected over realisable stage sums as in :mod:`stagewise.split._balance`: a successful probe lowers the
upper end to the largest stage time it produced; a failed one raises the lower end to the smallest time at which some
stage whose extension was blocked by time alone (not memory, not room) could take one more unit.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Sequence

from ..split import exact_ints, min_max_cuts

__all__ = ["Chain", "capped_min_max_cuts", "nested_live", "stage_memory"]

log = logging.getLogger(__name__)


def nested_live(live: Sequence[int]) -> list[int]:
    """``live`` made non-increasing by taking suffix maxima (never smaller than ``live``)."""
    out = [int(x) for x in live]
    for j in range(len(out) - 2, -1, -1):
        out[j] = max(out[j], out[j + 1])
    return out


def stage_memory(weight: Sequence[int], act: Sequence[int], starts: Sequence[int], live: Sequence[int], *,
                 input_act: int = 0) -> list[int]:
    """``mem_j`` of every stage of the cut beginning at ``starts`` (see the module docstring)."""
    bounds = [*starts, len(weight)]
    out = []
    for j in range(len(starts)):
        a, b = bounds[j], bounds[j + 1]
        held = (act[a - 1] if a > 0 else input_act) + sum(act[a:b])
        out.append(sum(weight[a:b]) + live[j] * held)
    return out


class Chain:
    """Prefix sums of one chain, shared by every cut of it (the search cuts one chain hundreds of times).

    ``act`` is given per unit at some base scale; :meth:`cut` multiplies it by ``live[j] * act_scale`` per stage.
    ``inbound=False``: a stage holds only ``sum(act[a:b])`` (``act`` already counts what each unit keeps of its input,
    as bytes saved for backward do); the greedy stays exact, since that too only shrinks when a stage loses units.
    """

    def __init__(self, time: Sequence[float], weight: Sequence[int], act: Sequence[int], input_act: int = 0, *,
                 inbound: bool = True) -> None:
        n = len(time)
        if n == 0:
            raise ValueError("cannot cut an empty chain (no units)")
        if not (len(weight) == len(act) == n):
            raise ValueError(f"time, weight and act need one entry per unit ({n}); got {len(weight)} and {len(act)}")
        ints = exact_ints(time)
        self.n = n
        self.ints = ints
        self.T = [0] * (n + 1)
        self.W = [0] * (n + 1)
        self.A = [0] * (n + 1)
        for i in range(n):
            self.T[i + 1] = self.T[i] + ints[i]
            self.W[i + 1] = self.W[i] + int(weight[i])
            self.A[i + 1] = self.A[i] + int(act[i])
        # held activations of [a, b) are A[b] - Ain[a], with Ain[a] = A[a - 1] (a > 0) and -input_act at a = 0;
        # without the inbound term Ain[a] = A[a]
        self.Ain = [-int(input_act)] + self.A[:-1] if inbound else list(self.A)
        self._free: dict[int, list[int]] = {}

    def memory(self, k: int, a: int, b: int) -> int:
        """Memory of stage [a, b) holding ``k`` (= live x act scale) copies of its activations."""
        return self.W[b] - self.W[a] + k * (self.A[b] - self.Ain[a])

    def leftmost_fitting(self, k: int, b: int, cap: int, lo: int) -> int:
        """Smallest ``a >= lo`` with ``memory(k, a, b) <= cap`` (``b`` if none): the key below grows with ``a``."""
        need = self.W[b] + k * self.A[b] - cap
        W, Ain = self.W, self.Ain
        return bisect_left(range(b + 1), need, lo, b, key=lambda a: W[a] + k * Ain[a])

    def bottleneck(self, starts: Sequence[int]) -> int:
        bounds = [*starts, self.n]
        return max(self.T[bounds[j + 1]] - self.T[bounds[j]] for j in range(len(starts)))

    def free_cut(self, stages: int) -> list[int]:
        """The unconstrained min-max cut (cached per stage count)."""
        if stages not in self._free:
            self._free[stages] = min_max_cuts(self.ints, stages)
        return self._free[stages]

    def cut(self, stages: int, live: Sequence[int], cap: int, *, act_scale: int = 1) -> list[int] | None:
        """The exact capped min-max cut (see :func:`capped_min_max_cuts`)."""
        if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
            raise ValueError(f"stages must be an int >= 1, got {stages!r}")
        if stages > self.n:
            raise ValueError(f"cannot cut {self.n} units into {stages} non-empty stages")
        if len(live) != stages:
            raise ValueError(f"live must have one entry per stage ({stages}), got {len(live)}")
        ks = [x * act_scale for x in nested_live(live)]
        # The unconstrained optimum is a lower bound; if its cut fits, it is the answer.
        free = self.free_cut(stages)
        bounds = [*free, self.n]
        if all(self.memory(ks[j], bounds[j], bounds[j + 1]) <= cap for j in range(stages)):
            return free
        starts, worst, _ = _pack(self, ks, cap, None)
        if starts is None:
            return None  # memory alone rules out every cut
        best, hi = starts, worst
        lo = self.bottleneck(free)  # no capped cut beats the unconstrained optimum
        probes = 1
        while lo < hi:
            mid = (lo + hi) // 2
            starts, worst, raise_to = _pack(self, ks, cap, mid)
            probes += 1
            if starts is not None:
                best, hi = starts, worst
            else:
                assert raise_to > mid, "a failed probe must name a larger bound (memory-only failure at a feasible cap)"
                lo = raise_to
        log.debug("capped cut: %d units, %d stages, %d probes", self.n, stages, probes)
        return best


def _pack(chain: Chain, ks: list[int], cap: int, bound: int | None) -> tuple[list[int] | None, int, int]:
    """Reverse greedy under time ``bound`` (None: no time bound); ``ks[j]`` multiplies stage j's activations.

    Returns ``(starts, worst, raise_to)``: ``starts`` of a feasible cut (``worst`` its largest stage time) or None,
    and then ``raise_to``, the smallest bound above ``bound`` that changes some time-blocked stage (-1 if none).
    """
    stages, T = len(ks), chain.T
    starts = [0] * stages
    end, worst, raise_to = chain.n, 0, -1

    def note(value: int) -> None:
        nonlocal raise_to
        if raise_to < 0 or value < raise_to:
            raise_to = value

    for j in range(stages - 1, 0, -1):
        a_mem = chain.leftmost_fitting(ks[j], end, cap, j)
        a_time = j if bound is None else max(j, bisect_left(T, T[end] - bound, j, end))
        a = max(a_mem, a_time)
        if a_time > a_mem and a_time > j:  # time alone stops this stage from reaching further left
            note(T[end] - T[a_time - 1])
        if a >= end:
            return None, worst, raise_to
        starts[j] = a
        worst = max(worst, T[end] - T[a])
        end = a
    if chain.memory(ks[0], 0, end) > cap:
        return None, worst, raise_to
    if bound is not None and T[end] > bound:
        note(T[end])
        return None, worst, raise_to
    return starts, max(worst, T[end]), raise_to


def capped_min_max_cuts(time: Sequence[float], stages: int, *, weight: Sequence[int], act: Sequence[int],
                        live: Sequence[int], cap: int, input_act: int = 0) -> list[int] | None:
    """Cut the chain into exactly ``stages`` non-empty stages, minimising the slowest stage subject to every stage's
    memory fitting under ``cap``; None if no cut fits. Returns the start index of every stage (the first is 0).

    ``weight``, ``act``, ``cap`` and ``input_act`` are ints (bytes, possibly scaled), so every comparison is exact;
    ``time`` is scaled to exact ints like :func:`~stagewise.split._balance.min_max_cuts` does.
    """
    return Chain(time, weight, act, input_act).cut(stages, live, cap)


