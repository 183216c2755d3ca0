"""The cost model: pure functions from unit profiles, a layout and a cut to predicted time and memory.

Terms (each a small function below, unit-tested on hand-computed examples):

- compute: a unit's forward/backward milliseconds at a microbatch of ``rows`` come from its profile
  (:class:`~stagewise.plan.ChainProfile`): interpolated between the row counts it was timed at (one row count:
  proportional to rows). The loss is part of the last unit. A stage's cost is the sum over its units, plus the
  runtime's ``action_overhead`` per compute action (F and B; I and W under ZB).
- transfer: the activation crossing a cut (``out_bytes`` of the stage's last unit, scaled by rows) moves in
  ``latency + bytes / bandwidth`` forward, and its gradient (same size) back. The bytes/bandwidth part occupies the
  link (transfers on one link queue), the latency part does not. The ranks pay too: the sender is busy
  ``send_overhead`` posting it, the receiver ``recv_overhead`` taking it in (the runtime's SEND and RECV actions).
- all-reduce (train, ``D > 1``): ring all-reduce of the rank's gradient bytes, ``2 (D-1)/D * bytes / bandwidth`` plus
  ``2 (D-1)`` ring-step latencies; every step also ends with an all-reduce of the loss over all ranks.
- optimizer: the profiled optimizer step of the rank's units (:mod:`stagewise.plan._optimizer`), or
  ``param bytes * seconds_per_byte``.
- data: the ranks that read inputs or targets (those holding the first or the last stage) load their replica's
  batch before the pipeline starts.
- step time: the schedule is *simulated* with those stage and transfer costs (:func:`simulate_costs`, which matches
  :func:`stagewise.schedule.simulate` and adds per-boundary link and per-rank transfer costs); each rank's all-reduce
  and optimizer follow its last action, and the step ends with the loss all-reduce. On nodes whose devices slow each
  other down (CPU cores: :attr:`~stagewise.plan.Cluster.contention` > 1) the step is simulated with compute shared
  (:func:`~stagewise.plan._shared.simulate_shared`).
- memory per rank: parameters + gradients + optimizer state (train; Adam keeps 2x params) or parameters (serve), plus
  per microbatch the activations a stage holds (its input and every unit's output, scaled to ``rows``) times the most
  microbatches in flight at that stage under the schedule (:func:`activation_peaks`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from ..schedule import SCHEDULE_NAMES
from ..schedule._builders import _one_f_one_b_order

__all__ = [
    "activation_peaks",
    "allreduce_time",
    "optimizer_time",
    "pipeline_lower_bound",
    "rank_lists",
    "simulate_costs",
    "transfer_time",
    "STATE_FACTORS",
]

STATE_FACTORS = {"adam": 2, "adamw": 2, "sgd": 1}
"""Optimizer state per parameter byte (Adam: two moments; SGD: one momentum buffer, counted even if unused)."""


def transfer_time(nbytes: float, *, bandwidth: float, latency: float) -> float:
    """Seconds to move ``nbytes`` over one link: ``latency + nbytes / bandwidth``."""
    return latency + nbytes / bandwidth


def allreduce_time(nbytes: float, *, replicas: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``replicas`` devices (0 for one replica)."""
    if replicas <= 1:
        return 0.0
    return 2 * (replicas - 1) / replicas * nbytes / bandwidth + 2 * (replicas - 1) * latency


def optimizer_time(param_bytes: float, *, seconds_per_byte: float) -> float:
    """Seconds of the optimizer step over ``param_bytes`` of parameters."""
    return param_bytes * seconds_per_byte


def activation_peaks(schedule: str, *, ranks: int, microbatches: int, stages_per_rank: int = 1) -> list[int]:
    """Most microbatches alive (F run, B/I not yet) at each stage: what
    :func:`stagewise.schedule.peak_activations` reports for ``build(schedule, ...)``, in closed form (building big
    schedules is slow). GPipe: M; 1F1B and ZB: ``min(M, P - s)``; interleaved: counted from its 1F1B order."""
    P, M, V = ranks, microbatches, stages_per_rank
    if schedule == "gpipe":
        return [M] * P
    if schedule in ("1f1b", "zb") or (schedule == "interleaved" and V == 1):
        return [min(M, P - s) for s in range(P)]
    if schedule != "interleaved":
        raise ValueError(f"unknown schedule {schedule!r}")
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


_RankLists = tuple[tuple[tuple[int, int, int], ...], ...]


@functools.lru_cache(maxsize=256)
def rank_lists(schedule: str, ranks: int, microbatches: int, stages_per_rank: int = 1) -> _RankLists:
    """Each rank's compute actions as ``(kind, stage, microbatch)`` with kind 0=F, 1=B, 2=I, 3=W: the lists
    :func:`stagewise.schedule.build` makes (a test pins them equal), without building ``Action`` objects, which takes
    most of a search's time for schedules of thousands of actions. Uses the builders' own 1F1B ordering."""
    P, M, V = ranks, microbatches, stages_per_rank
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if schedule != "interleaved" and V != 1:
        raise ValueError(f"stages_per_rank={V} needs the 'interleaved' schedule")
    if schedule == "interleaved" and M % P:
        raise ValueError(f"interleaved needs microbatches ({M}) to be a multiple of ranks ({P})")
    out = []
    for r in range(P):
        if schedule == "gpipe":
            acts = [(0, r, m) for m in range(M)] + [(1, r, m) for m in range(M)]
        elif schedule == "1f1b" or (schedule == "interleaved" and V == 1):
            acts = [(0 if kind == "F" else 1, r, m) for kind, m in _one_f_one_b_order(warmup=P - 1 - r, total=M)]
        elif schedule == "zb":
            deferred = min(r, M)
            acts = []
            for kind, m in _one_f_one_b_order(warmup=P - 1 - r, total=M):
                if kind == "F":
                    acts.append((0, r, m))
                else:
                    acts.append((2, r, m))
                    if m >= deferred:
                        acts.append((3, r, m))
            acts += [(3, r, m) for m in range(deferred)]
        else:
            per_round = P * V
            acts = []
            for kind, k in _one_f_one_b_order(warmup=(V - 1) * P + 2 * (P - 1 - r), total=M * V):
                chunk = (k % per_round) // P
                if kind == "B":
                    chunk = V - 1 - chunk
                acts.append((0 if kind == "F" else 1, chunk * P + r, (k // per_round) * P + k % P))
        out.append(tuple(acts))
    return tuple(out)


def simulate_costs(schedule: str, *, ranks: int, microbatches: int, stages_per_rank: int = 1,
                   forward: Sequence[float], backward: Sequence[float], weight: Sequence[float] | None = None,
                   send_forward: Sequence[tuple[float, float]] | None = None,
                   send_backward: Sequence[tuple[float, float]] | None = None, send_cost: float = 0.0,
                   recv_cost: float = 0.0, start: Sequence[float] | None = None,
                   tail: Sequence[float] | None = None) -> tuple[float, float, list[float]]:
    """Simulate one step of ``schedule``; returns ``(step_time, bubble_fraction, busy per rank)``.

    Same rules as :func:`stagewise.schedule.simulate` (each rank runs its list in order; an action starts when its
    rank is free and its inputs are there), plus per-boundary links: ``send_forward[j] = (latency, occupancy)`` for
    the activation from stage ``j`` to ``j + 1``, ``send_backward[j]`` for the gradient from ``j + 1`` to ``j``
    (both ignored when the two stages share a rank). A value arrives ``occupancy`` after the link is free and it was
    produced, plus ``latency``; the link is busy meanwhile. With zero occupancy and one latency everywhere this equals
    ``simulate(..., comm_cost=latency)``. ``weight`` is the W part of a split backward (default half of it).

    What a transfer costs the ranks themselves (the runtime's SEND and RECV actions): the producing rank is busy
    ``send_cost`` after the compute before the value leaves, the consuming rank ``recv_cost`` once it has arrived,
    before the compute. Rank ``r`` starts at ``start[r]`` (e.g. after loading its batch) and works ``tail[r]`` after
    its last action (gradient all-reduce, optimizer); the step ends when the last rank does. The bubble is the idle
    share of the pipeline part (up to the last action), compute only.
    """
    S = ranks * stages_per_rank
    M = microbatches
    fw, bw = list(forward), list(backward)
    wd = [b / 2 for b in bw] if weight is None else list(weight)
    iw = [b - w for b, w in zip(bw, wd)]
    zero = [(0.0, 0.0)] * max(S - 1, 0)
    lat_f, occ_f = zip(*send_forward) if send_forward is not None and S > 1 else zip(*zero) if S > 1 else ((), ())
    lat_b, occ_b = zip(*send_backward) if send_backward is not None and S > 1 else zip(*zero) if S > 1 else ((), ())
    local = [j % ranks == (j + 1) % ranks for j in range(S - 1)]
    lists = rank_lists(schedule, ranks, M, stages_per_rank)
    # Flat (stage * M + microbatch) tables of when an input is there; -1: not yet. Stage 0 has its inputs at 0, the
    # last stage its output gradient (the loss) as soon as its forward ran, which its own list order guarantees.
    f_ready = [0.0] * M + [-1.0] * ((S - 1) * M)
    g_ready = [-1.0] * ((S - 1) * M) + [0.0] * M
    link_f = [0.0] * S
    link_b = [0.0] * S
    clock = [0.0] * ranks if start is None else [float(x) for x in start]
    nxt = [0] * ranks
    last = S - 1
    left = sum(len(x) for x in lists)
    while left:
        moved = left
        for r in range(ranks):
            actions, i, t = lists[r], nxt[r], clock[r]
            count = len(actions)
            while i < count:
                kind, s, m = actions[i]
                if kind == 0:
                    ready = f_ready[s * M + m]
                    if ready < 0:
                        break
                    t = (t if t > ready else ready) + fw[s]
                    if s > 0 and not local[s - 1]:
                        t += recv_cost
                    if s < last:
                        if local[s]:
                            f_ready[s * M + M + m] = t
                        else:
                            t += send_cost
                            free = link_f[s]
                            free = (t if t > free else free) + occ_f[s]
                            link_f[s] = free
                            f_ready[s * M + M + m] = free + lat_f[s]
                elif kind == 3:
                    t += wd[s]  # W follows its I on this rank
                else:
                    ready = g_ready[s * M + m]
                    if ready < 0:
                        break
                    t = (t if t > ready else ready) + (bw[s] if kind == 1 else iw[s])
                    if s < last and not local[s]:
                        t += recv_cost
                    if s > 0:
                        if local[s - 1]:
                            g_ready[s * M - M + m] = t
                        else:
                            t += send_cost
                            free = link_b[s - 1]
                            free = (t if t > free else free) + occ_b[s - 1]
                            link_b[s - 1] = free
                            g_ready[s * M - M + m] = free + lat_b[s - 1]
                i += 1
            left -= i - nxt[r]
            nxt[r], clock[r] = i, t
        assert left < moved, f"simulate_costs: {schedule} deadlocked (ranks={ranks}, microbatches={M})"
    busy = [0.0] * ranks
    for s in range(S):
        busy[s % ranks] += M * (fw[s] + bw[s])
    span = max(clock)
    bubble = 1.0 - sum(busy) / (ranks * span) if span > 0 else 0.0
    step = span if tail is None else max(c + x for c, x in zip(clock, tail))
    return step, bubble, busy


def pipeline_lower_bound(schedule: str, *, ranks: int, busy: Sequence[float], forward: Sequence[float],
                         backward: Sequence[float], fwd_delay: Sequence[float], bwd_delay: Sequence[float],
                         start: Sequence[float] | None = None, tail: Sequence[float] | None = None) -> float:
    """A cheap lower bound on :func:`simulate_costs`' step time: rank ``r`` cannot start before ``start[r]`` nor
    before microbatch 0's forward reached it, works ``busy[r]`` (everything it does in the pipeline, transfer costs
    on the rank included), then ``tail[r]``; and (except ZB, whose last actions are deferred W) its last backward
    still has to travel back through stages ``r - 1 .. 0`` before rank 0's tail. ``fwd_delay[j]``: the least time
    from the end of stage ``j``'s forward to its value arriving at ``j + 1``; ``bwd_delay[j]``: from the end of stage
    ``j + 1``'s backward until stage ``j`` can compute on the gradient."""
    begin = [0.0] * ranks if start is None else list(start)
    after = [0.0] * ranks if tail is None else list(tail)
    best = 0.0
    head = begin[0]
    back = 0.0
    for r in range(ranks):
        if r > 0:
            head += forward[r - 1] + fwd_delay[r - 1]
            back += backward[r - 1] + bwd_delay[r - 1]
        work = max(head, begin[r]) + busy[r]
        best = max(best, work + after[r])
        if schedule != "zb" and r > 0:
            best = max(best, work + back + after[0])
    return best
