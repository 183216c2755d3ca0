"""The one schedule engine: run a compiled schedule's per-rank action lists on paper, with costs.

Every question about "what runs when" goes through :func:`run`: :func:`~stagewise.schedule.validate` runs it with
zero costs to find deadlocks, :func:`~stagewise.schedule.simulate` runs it with stage costs for a timeline, and the
planner runs it with its whole cost model on the very lists the runtime executes (``add_communication(build(...))``).

The rules, one rank at a time: a rank runs its list in order; an action starts once its rank is free and what it
needs has finished. A value made on one rank reaches another through the link of that stage boundary and direction:
it enters the link when it was made and the link is free, holds the link ``occupancy`` seconds (transfers on one
link queue), and arrives ``latency`` after leaving it. SEND and RECV actions cost their rank ``send_overhead`` /
``recv_overhead`` (posting the message, taking it in). A rank starts at ``start[r]`` and, after its last action,
works ``tail[r]`` fixed seconds (all-reduces) and then ``tail_work[r]`` of compute (the optimizer step).

Transfers folded into compute (a :attr:`CompiledSchedule.folded` schedule, what the planner runs): an action may hold
its rank ``before[a]`` fixed seconds once what it needs is there and before it computes (taking in a value from
another rank: RECV), and ``after[a]`` after it (posting its value: SEND; the value enters its link then). That is
the very arithmetic of separate RECV, compute and SEND actions in a row, with a third of the actions to step.

Shared compute (CPU cores of one node slow each other down): with ``contention`` c, a node of ``n`` devices, and
``k`` of them computing, each computes at rate ``1 / (1 + (c - 1) (k - 1) / (n - 1))``. Compute is then fluid work
and the engine steps from event to event (a rate changes whenever a rank starts or stops computing). Without
contention an action's end is known when it starts, so each rank runs ahead as far as its inputs allow: the same
state machine, stepped with an infinite horizon (its idle phase's steps in one tight loop). Replicas of the pipeline
run the same timeline, so rank ``r``'s replicas on the same node compute whenever ``r`` does: ``share[r][q]`` counts
the copies of rank ``q`` (over all replicas) on the node of rank ``r``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from ._actions import Action, RawSchedule, Schedule, ScheduleError

__all__ = ["CompiledSchedule", "Run", "Sharing", "run"]

KIND_CODES = {"F": 0, "B": 1, "I": 2, "W": 3, "SEND_F": 4, "SEND_B": 4, "RECV_F": 5, "RECV_B": 5}
"""Action kind -> engine code: 0-3 compute (F, B, I, W), 4 a send, 5 a receive."""

_IDLE, _FIXED, _WORK, _TAIL, _TAIL_WORK, _DONE, _BEFORE, _AFTER = range(8)


@dataclasses.dataclass(frozen=True, eq=False)
class CompiledSchedule:
    """A validated schedule as flat tables the engine reads (cost-independent; compile once, run many times).

    Actions are numbered 0..N-1 in rank-major order; ``ids[r]`` is the range of rank ``r``'s, in order. Made by
    :func:`~stagewise.schedule.compile_schedule` (or, for a builder's schedule, by
    :func:`~stagewise.schedule.build_compiled`).
    """

    raw: RawSchedule
    """The schedule's actions as key tuples (what was compiled)."""
    ids: tuple[range, ...]
    code: tuple[int, ...]
    """Per action: :data:`KIND_CODES` value."""
    stage: tuple[int, ...]
    needs: tuple[Sequence[int], Sequence[int]]
    """Two columns: per action, what it waits for (none, one or two actions), as slots of the engine's time table:
    ``2 * d`` for the end of action ``d`` on its own rank, ``2 * d + 1`` for the arrival of the value of action ``d``
    from another rank; -1 for none (the second column only when the first has one)."""
    link: tuple[int, ...]
    """Per action: the link its value leaves by for another rank, ``2 * boundary`` forward (stage ``b`` to ``b + 1``)
    or ``2 * boundary + 1`` backward (``b + 1`` to ``b``); -1 when nothing leaves the rank."""
    cost_index: np.ndarray
    """Per action: ``code * stages + stage``, its entry in a flat (code, stage) table of costs."""
    crossing: tuple[np.ndarray, np.ndarray]
    """Two boolean columns: per action, does it wait for a value from another rank (an odd slot in ``needs``), does
    its value leave for another rank (a ``link``)? Where a :attr:`folded` schedule pays its RECVs and SENDs."""
    computes: list[bool]
    """Per action: is it compute (F, B, I, W)?"""
    folded: bool = False
    """True: a compute-only schedule standing for the one with communication added
    (:func:`~stagewise.schedule.add_communication`), its transfers folded into the compute actions: an action that
    waits for a value from another rank (an odd slot in ``needs``) pays the RECV before computing, one whose value
    leaves by a link pays the SEND after (:func:`run`'s ``before`` and ``after``). Made by
    :func:`~stagewise.schedule.build_compiled` with ``folded=True``."""
    given: dataclasses.InitVar[Schedule | None] = None
    """The :class:`Schedule` that was compiled, when there was one (else it is made from ``raw`` when asked)."""

    def __post_init__(self, given: Schedule | None) -> None:
        if given is not None:
            self.__dict__["schedule"] = given  # what the cached property below would return

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The compiled schedule (made on first access when compiled from keys)."""
        return self.raw.to_schedule()

    @functools.cached_property
    def actions(self) -> tuple[Action, ...]:
        """Action number -> :class:`Action`."""
        sched = self.schedule
        return tuple(a for rank in range(sched.ranks) for a in sched.actions[rank])


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sharing:
    """How ranks slow each other down when they compute at once (see the module docstring)."""

    contention: float
    """Slowdown with every device of the node computing (1: none)."""
    pool: Sequence[int]
    """Per rank: devices on its node."""
    share: Sequence[Sequence[int]]
    """``share[r][q]``: copies of rank ``q`` (over all replicas) on rank ``r``'s node."""

    def __post_init__(self) -> None:
        if not self.contention >= 1.0:
            raise ValueError(f"Sharing.contention must be >= 1 (1: no slowdown), got {self.contention!r}")
        if len(self.share) != len(self.pool) or any(len(row) != len(self.pool) for row in self.share):
            raise ValueError(f"Sharing.share must be a {len(self.pool)} x {len(self.pool)} table (one row and column "
                             f"per rank, like pool), got {[len(row) for row in self.share]} columns per row")
        if any(n < 1 for n in self.pool):
            raise ValueError(f"Sharing.pool counts devices per node, each >= 1, got {list(self.pool)}")


@dataclasses.dataclass(frozen=True)
class Run:
    """What :func:`run` returns: per action its (start, end), per rank when its list and its step ended."""

    start: list[float]
    end: list[float]
    pipeline_end: list[float]
    finish: list[float]


def run(compiled: CompiledSchedule, *, durations: Sequence[float], links: Sequence[tuple[float, float]],
        before: Sequence[float] | None = None, after: Sequence[float] | None = None,
        start: Sequence[float] | None = None, tail: Sequence[float] | None = None,
        tail_work: Sequence[float] | None = None, sharing: Sharing | None = None) -> Run:
    """Run ``compiled`` with ``durations[a]`` per action (compute at rate 1) and ``links[l] = (latency, occupancy)``
    per link (indexed as :attr:`CompiledSchedule.link`); ``before[a]`` / ``after[a]``: fixed seconds around action
    ``a``'s own (folded transfers; none by default). ``start``/``end`` of an action are those of its own part.
    Raises :class:`ScheduleError` on a deadlock."""
    n, ranks = len(compiled.code), len(compiled.ids)
    state = _State(
        durations=durations, links=links, pre=[0.0] * n if before is None else before,
        post=[0.0] * n if after is None else after, began=[-1.0] * n, times=[-1.0] * (2 * n),
        link_free=[0.0] * len(links), clock=[0.0] * ranks if start is None else [float(x) for x in start],
    )
    fixed_tail = [0.0] * ranks if tail is None else [float(x) for x in tail]
    work_tail = [0.0] * ranks if tail_work is None else [float(x) for x in tail_work]
    if sharing is not None and sharing.contention > 1.0:
        pipe_end, finish = _run_shared(compiled, state, fixed_tail, work_tail, sharing)
    else:
        _sweep(compiled, state)
        pipe_end = list(state.clock)
        finish = [(t + f) + w for t, f, w in zip(pipe_end, fixed_tail, work_tail)]
    return Run(start=state.began, end=state.times[0::2], pipeline_end=pipe_end, finish=finish)


@dataclasses.dataclass(slots=True, kw_only=True)
class _State:
    """What a run reads and writes, per action (``durations``, ``pre``, ``post``, ``began``; ``times``: ``2a`` when
    action ``a`` ended, ``2a + 1`` when its value reached the other rank), link and rank."""

    durations: Sequence[float]
    links: Sequence[tuple[float, float]]
    pre: Sequence[float]
    post: Sequence[float]
    began: list[float]
    times: list[float]
    link_free: list[float]
    clock: list[float]


def _sweep(c: CompiledSchedule, state: _State) -> None:
    """Without contention an action's end is known when it starts: sweep the ranks, each running its list while what
    its next action needs is there, until all are done (one tight loop: the planner runs millions of actions). Sweeps
    alternate direction, since forwards flow down the ranks and backwards up them."""
    need0, need1 = c.needs
    out_link = c.link
    durations, links, pre, post = state.durations, state.links, state.pre, state.post
    began, times, link_free, clock = state.began, state.times, state.link_free, state.clock
    nxt = [ids.start for ids in c.ids]  # per rank: its next action (numbered rank-major, so its list is a range)
    ends = [ids.stop for ids in c.ids]
    left = len(c.code)
    down = list(range(len(c.ids)))
    sweep, other = down, down[::-1]
    while left:
        moved = 0
        for r in sweep:
            a, end = nxt[r], ends[r]
            if a == end:
                continue
            first, t0 = a, clock[r]
            while a < end:
                t = t0
                slot = need0[a]
                if slot >= 0:
                    e = times[slot]
                    if e < 0:
                        break
                    if e > t:
                        t = e
                    slot = need1[a]
                    if slot >= 0:
                        e = times[slot]
                        if e < 0:
                            break
                        if e > t:
                            t = e
                t = t + pre[a]
                began[a] = t
                t0 = t + durations[a]
                times[2 * a] = t0
                t0 = t0 + post[a]
                out = out_link[a]
                if out >= 0:
                    latency, occupancy = links[out]
                    free = link_free[out]
                    free = (free if free > t0 else t0) + occupancy
                    link_free[out] = free
                    times[2 * a + 1] = free + latency
                a += 1
            if a > first:
                moved += a - first
                nxt[r], clock[r] = a, t0
        if not moved:
            _deadlock(c, [a - ids.start for a, ids in zip(nxt, c.ids)], [_IDLE] * len(c.ids), times)
        left -= moved
        sweep, other = other, sweep


def _run_shared(c: CompiledSchedule, state: _State, fixed_tail: list[float], work_tail: list[float],
                sharing: Sharing) -> tuple[list[float], list[float]]:
    """With contention: step from event to event (every rank's phase, compute as fluid work); returns (pipeline end,
    finish) per rank."""
    ranks = len(c.ids)
    need0, need1 = c.needs
    out_link = c.link
    durations, links, pre, post = state.durations, state.links, state.pre, state.post
    began, times, link_free, clock = state.began, state.times, state.link_free, state.clock
    phase = [_IDLE] * ranks
    pos = [0] * ranks
    until = [0.0] * ranks  # end of a fixed phase
    left = [0.0] * ranks  # compute left in a work phase (seconds at rate 1)
    pipe_end = [0.0] * ranks
    finish = [0.0] * ranks

    def finish_action(r: int, a: int, t: float) -> None:
        """Action ``a``'s own part ended at ``t``: on to its ``after`` part, or done."""
        times[2 * a] = t
        if post[a] > 0:
            phase[r], until[r] = _AFTER, t + post[a]
        else:
            leave(r, a, t)

    def leave(r: int, a: int, t: float) -> None:
        """Action ``a`` is done at ``t``; its value (if another rank takes it) enters its link."""
        out = out_link[a]
        if out >= 0:
            latency, occupancy = links[out]
            free = link_free[out]
            free = (free if free > t else t) + occupancy
            link_free[out] = free
            times[2 * a + 1] = free + latency
        clock[r] = t
        pos[r] += 1
        phase[r] = _IDLE

    def begin(r: int, a: int, t: float) -> None:
        """Action ``a``'s own part starts at ``t``."""
        began[a] = t
        if c.code[a] < 4:
            phase[r], left[r] = _WORK, durations[a]
        else:
            phase[r], until[r] = _FIXED, t + durations[a]

    def ready_at(r: int, a: int) -> float:
        """When action ``a`` can start on rank ``r``; -1 while something it needs has not run yet."""
        t = clock[r]
        for slot in (need0[a], need1[a]):
            if slot < 0:
                break
            e = times[slot]
            if e < 0:
                return -1.0
            if e > t:
                t = e
        return t

    def settle(r: int, now: float) -> bool:
        """Move rank ``r`` through every phase that ends by ``now``; True if it moved."""
        ids = c.ids[r]
        moved = False
        while True:
            ph = phase[r]
            if ph == _IDLE:
                if pos[r] == len(ids):
                    pipe_end[r] = clock[r]
                    phase[r], until[r] = _TAIL, clock[r] + fixed_tail[r]
                    moved = True
                    continue
                a = ids[pos[r]]
                t = ready_at(r, a)
                if t < 0 or t > now:
                    return moved
                moved = True
                if pre[a] > 0:
                    phase[r], until[r] = _BEFORE, t + pre[a]
                else:
                    begin(r, a, t)
            elif ph == _BEFORE:
                if until[r] > now:
                    return moved
                begin(r, ids[pos[r]], until[r])
            elif ph == _AFTER:
                if until[r] > now:
                    return moved
                leave(r, ids[pos[r]], until[r])
            elif ph == _FIXED:
                if until[r] > now:
                    return moved
                finish_action(r, ids[pos[r]], until[r])
            elif ph == _WORK:
                if left[r] > 0:
                    return moved
                finish_action(r, ids[pos[r]], now)
            elif ph == _TAIL:
                if until[r] > now:
                    return moved
                phase[r], left[r], clock[r] = _TAIL_WORK, work_tail[r], until[r]
            elif ph == _TAIL_WORK:
                if left[r] > 0:
                    return moved
                phase[r], finish[r] = _DONE, now
            else:
                return moved

    now = 0.0
    while True:
        moved = True
        while moved:  # every rank settles each pass (one's output may unblock a rank settled before it)
            moved = False
            for r in range(ranks):
                moved = settle(r, now) or moved
        if all(ph == _DONE for ph in phase):
            return pipe_end, finish
        step_to = _next_event(c, sharing, now=now, phase=phase, pos=pos, left=left, until=until, ready_at=ready_at)
        if step_to is None:
            _deadlock(c, pos, phase, times)
        assert step_to is not None
        now = step_to


def _next_event(c: CompiledSchedule, sharing: Sharing, *, now: float, phase: list[int], pos: list[int],
                left: list[float], until: list[float], ready_at: Callable[[int, int], float]) -> float | None:
    """Advance the computing ranks' work to the next moment something happens; return that moment (None: nothing
    will, a deadlock)."""
    ranks = len(phase)
    active = [1 if ph in (_WORK, _TAIL_WORK) else 0 for ph in phase]
    rate = [1.0] * ranks
    for r in range(ranks):
        devices = sharing.pool[r]
        if active[r] and devices > 1:
            k = sum(a * m for a, m in zip(active, sharing.share[r]))
            rate[r] = 1.0 / (1.0 + (sharing.contention - 1.0) * max(0, k - 1) / (devices - 1))
    best, who = math.inf, -1
    for r in range(ranks):
        ph = phase[r]
        if active[r]:
            when = now + left[r] / rate[r]
        elif ph in (_FIXED, _TAIL, _BEFORE, _AFTER):
            when = until[r]
        elif ph == _IDLE:
            t = ready_at(r, c.ids[r][pos[r]])
            when = t if t >= 0 else math.inf
        else:
            continue
        if when < best:
            best, who = when, r
    if who < 0:
        return None
    dt = best - now
    for r in range(ranks):
        if active[r]:
            left[r] = 0.0 if r == who else left[r] - dt * rate[r]
            if left[r] < 1e-15:  # float residue of a rank finishing at the same moment
                left[r] = 0.0
    return best


def _deadlock(c: CompiledSchedule, pos: list[int], phase: list[int], times: list[float]) -> None:
    where = {a: (r, k) for r, ids in enumerate(c.ids) for k, a in enumerate(ids)}
    stuck = [r for r in range(len(c.ids)) if phase[r] == _IDLE and pos[r] < len(c.ids[r])]
    waits = []
    for r in stuck:
        a = c.ids[r][pos[r]]
        missing = [slot // 2 for slot in (c.needs[0][a], c.needs[1][a]) if slot >= 0 and times[slot] < 0]
        on = ", ".join(f"{c.actions[d]} (rank {where[d][0]}, step {where[d][1]})" for d in missing)
        waits.append(f"rank {r} step {pos[r]} {c.actions[a]} waits for {on}")
    first = stuck[0]
    raise ScheduleError(
        "deadlock: no rank can make progress; " + "; ".join(waits),
        rank=first,
        step=pos[first],
        action=c.actions[c.ids[first][pos[first]]],
        schedule=c.schedule,
    )
