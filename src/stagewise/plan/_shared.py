"""Simulating a step when ranks share compute: CPU cores of one node slow each other down.

Cores of one machine share memory bandwidth and caches, so a rank computes more slowly while others compute too. The
cluster says how much (:attr:`~stagewise.plan.Cluster.contention`: the slowdown with every device of the node busy);
with ``k`` of a node's ``n`` devices computing, each computes at rate ``1 / (1 + (contention - 1) (k - 1) / (n - 1))``.
:func:`simulate_shared` is :func:`~stagewise.plan.simulate_costs` with compute as fluid work at that rate (an event
simulation: rates change whenever a rank starts or stops computing). Waiting, transfers and their rank-side costs are
fixed durations that do not count as computing. Replicas of the pipeline run the same timeline, so rank ``r``'s
replicas on the same node compute whenever ``r`` does: ``share[r][q]`` counts the copies of rank ``q`` (over all
replicas) on the node of rank ``r`` of the simulated replica.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._cost import rank_lists

__all__ = ["simulate_shared"]

# Phases of a rank: before its start, between actions, waiting for an input, taking it in (recv), computing, posting
# its output (send), the tail's fixed part, the tail's compute, done.
_START, _NEXT, _INPUT, _RECV, _WORK, _SEND, _TAIL, _TAIL_WORK, _DONE = range(9)


def simulate_shared(schedule: str, *, ranks: int, microbatches: int, stages_per_rank: int = 1,
                    forward: Sequence[float], backward: Sequence[float], weight: Sequence[float] | None = None,
                    send_forward: Sequence[tuple[float, float]] | None = None,
                    send_backward: Sequence[tuple[float, float]] | None = None, send_cost: float = 0.0,
                    recv_cost: float = 0.0, start: Sequence[float] | None = None,
                    tail: Sequence[float] | None = None, tail_work: Sequence[float] | None = None,
                    contention: float = 1.0, pool: Sequence[int] | None = None,
                    share: Sequence[Sequence[int]] | None = None) -> tuple[float, float, list[float]]:
    """One step of ``schedule`` with shared compute; returns ``(step_time, bubble_fraction, busy per rank)`` like
    :func:`~stagewise.plan.simulate_costs` (whose arguments these are), where ``tail[r]`` is rank ``r``'s fixed tail
    (all-reduces) and ``tail_work[r]`` its compute after it (the optimizer step). ``pool[r]``: devices of rank ``r``'s
    node (default: all ranks on one node of ``ranks`` devices); ``share``: see the module docstring (default: one
    copy of every rank on that node, i.e. one replica). Compute times are at rate 1 (alone on the node)."""
    P, M, V = ranks, microbatches, stages_per_rank
    S = P * V
    fw, bw = list(forward), list(backward)
    wd = [b / 2 for b in bw] if weight is None else list(weight)
    iw = [b - w for b, w in zip(bw, wd)]
    zero = [(0.0, 0.0)] * max(S - 1, 0)
    links_f = list(send_forward) if send_forward is not None else zero
    links_b = list(send_backward) if send_backward is not None else zero
    local = [j % P == (j + 1) % P for j in range(S - 1)]
    begin = [0.0] * P if start is None else [float(x) for x in start]
    fixed_tail = [0.0] * P if tail is None else [float(x) for x in tail]
    work_tail = [0.0] * P if tail_work is None else [float(x) for x in tail_work]
    devices = [P] * P if pool is None else list(pool)
    shares = [[1] * P for _ in range(P)] if share is None else [list(x) for x in share]
    lists = rank_lists(schedule, P, M, V)
    f_ready = [0.0] * M + [-1.0] * ((S - 1) * M)
    g_ready = [-1.0] * ((S - 1) * M) + [0.0] * M
    link_f = [0.0] * S
    link_b = [0.0] * S
    phase = [_START] * P
    index = [0] * P
    until = [0.0] * P  # end of a fixed phase
    left = [0.0] * P  # compute left in a work phase (seconds at rate 1)
    pipe_end = [0.0] * P
    finish = [0.0] * P

    def settle(r: int, t: float) -> None:
        """Move rank ``r`` through every phase that can end at time ``t``."""
        while True:
            ph = phase[r]
            if ph == _START:
                if begin[r] > t:
                    return
                phase[r] = _NEXT
            elif ph == _NEXT:
                if index[r] == len(lists[r]):
                    pipe_end[r] = t
                    phase[r], until[r] = _TAIL, t + fixed_tail[r]
                else:
                    phase[r] = _INPUT
            elif ph == _INPUT:
                kind, s, m = lists[r][index[r]]
                if kind == 3:
                    phase[r], left[r] = _WORK, wd[s]
                    continue
                ready = f_ready[s * M + m] if kind == 0 else g_ready[s * M + m]
                if ready < 0 or ready > t:
                    return
                remote = (s > 0 and not local[s - 1]) if kind == 0 else (s < S - 1 and not local[s])
                phase[r], until[r] = _RECV, t + (recv_cost if remote else 0.0)
            elif ph == _RECV:
                if until[r] > t:
                    return
                kind, s, m = lists[r][index[r]]
                phase[r], left[r] = _WORK, fw[s] if kind == 0 else bw[s] if kind == 1 else iw[s]
            elif ph == _WORK:
                if left[r] > 0:
                    return
                kind, s, m = lists[r][index[r]]
                remote = False
                if kind == 0 and s < S - 1:
                    remote = not local[s]
                    if local[s]:
                        f_ready[s * M + M + m] = t
                elif kind in (1, 2) and s > 0:
                    remote = not local[s - 1]
                    if local[s - 1]:
                        g_ready[s * M - M + m] = t
                phase[r], until[r] = _SEND, t + (send_cost if remote else 0.0)
            elif ph == _SEND:
                if until[r] > t:
                    return
                kind, s, m = lists[r][index[r]]
                if kind == 0 and s < S - 1 and not local[s]:
                    free = max(t, link_f[s]) + links_f[s][1]
                    link_f[s] = free
                    f_ready[s * M + M + m] = free + links_f[s][0]
                elif kind in (1, 2) and s > 0 and not local[s - 1]:
                    free = max(t, link_b[s - 1]) + links_b[s - 1][1]
                    link_b[s - 1] = free
                    g_ready[s * M - M + m] = free + links_b[s - 1][0]
                index[r] += 1
                phase[r] = _NEXT
            elif ph == _TAIL:
                if until[r] > t:
                    return
                phase[r], left[r] = _TAIL_WORK, work_tail[r]
            elif ph == _TAIL_WORK:
                if left[r] > 0:
                    return
                phase[r], finish[r] = _DONE, t
            else:
                return

    t = 0.0
    while True:
        for _ in range(2):  # a rank's output may unblock a rank settled before it; a second pass catches it
            for r in range(P):
                settle(r, t)
        if all(ph == _DONE for ph in phase):
            break
        active = [1 if ph in (_WORK, _TAIL_WORK) else 0 for ph in phase]
        rate = [1.0] * P
        for r in range(P):
            if active[r] and devices[r] > 1:
                k = sum(a * n for a, n in zip(active, shares[r]))
                rate[r] = 1.0 / (1.0 + (contention - 1.0) * max(0, k - 1) / (devices[r] - 1))
        nxt, who = float("inf"), -1
        for r in range(P):
            ph = phase[r]
            if active[r]:
                when = t + left[r] / rate[r]
            elif ph in (_RECV, _SEND, _TAIL):
                when = until[r]
            elif ph == _START:
                when = begin[r]
            elif ph == _INPUT:
                kind, s, m = lists[r][index[r]]
                ready = f_ready[s * M + m] if kind == 0 else g_ready[s * M + m]
                when = ready if ready >= 0 else float("inf")
            else:
                continue
            if when < nxt:
                nxt, who = when, r
        assert who >= 0, f"simulate_shared: {schedule} deadlocked (ranks={P}, microbatches={M})"
        dt = nxt - t
        for r in range(P):
            if active[r]:
                left[r] = 0.0 if r == who else left[r] - dt * rate[r]
                if left[r] < 1e-15:  # float residue of a rank finishing at the same moment
                    left[r] = 0.0
        t = nxt
    busy = [0.0] * P
    for s in range(S):
        busy[s % P] += M * (fw[s] + bw[s])
    span = max(pipe_end)
    bubble = 1.0 - sum(busy) / (P * span) if span > 0 else 0.0
    return max(finish), bubble, busy
