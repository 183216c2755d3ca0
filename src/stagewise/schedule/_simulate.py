"""Predict a schedule's timeline from per-stage costs, without processes: the engine (:mod:`._engine`) with costs.

:func:`simulate` prices any schedule, compute-only or with SEND/RECV actions; the planner passes its whole cost
model (links that queue, rank-side transfer costs, a start and a tail per rank, shared compute) and the compiled
schedule the runtime runs (:func:`build_compiled`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._actions import Action, Schedule
from ._builders import add_communication_raw, build_raw
from ._engine import CompiledSchedule, Sharing, run
from ._validate import compile_built, compile_schedule

__all__ = ["Cost", "Interval", "Timeline", "build_compiled", "simulate"]

Cost = float | Sequence[float]
"""A cost for every stage (one float) or one per stage (a sequence of ``stages`` floats)."""


class Interval(NamedTuple):
    """When one action ran on its rank."""

    start: float
    end: float
    action: Action


@dataclasses.dataclass(kw_only=True)
class Timeline:
    """A (predicted or recorded) run of one schedule step."""

    schedule: str
    """Name of the schedule that ran."""
    intervals: Mapping[int, list[Interval]]
    """Rank -> (start, end, action) for each of its actions, in list order; a transfer takes its rank the send or
    receive overhead (0 by default: a RECV then sits at the moment its data arrived; the wait before it is idle)."""
    step_time: float
    """When the last rank finished: its last action, or its tail when one was given (the step starts at 0)."""
    bubble_fraction: float
    """Idle share of the pipeline part of all ranks' time: ``1 - sum(busy) / (ranks * T)``, ``T`` the end of the last
    action (tails are not part of it)."""
    busy: dict[int, float]
    """Rank -> compute cost of its F/B/I/W actions (seconds or cost units at full speed)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; actions in their text form, rank keys as strings."""
        return {
            "schedule": self.schedule,
            "intervals": {
                str(rank): [[iv.start, iv.end, str(iv.action)] for iv in ivs] for rank, ivs in self.intervals.items()
            },
            "step_time": self.step_time,
            "bubble_fraction": self.bubble_fraction,
            "busy": {str(rank): value for rank, value in self.busy.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Timeline:
        """Inverse of :meth:`to_dict`."""
        return cls(
            schedule=data["schedule"],
            intervals={
                int(rank): [Interval(float(s), float(e), Action.parse(a)) for s, e, a in ivs]
                for rank, ivs in data["intervals"].items()
            },
            step_time=float(data["step_time"]),
            bubble_fraction=float(data["bubble_fraction"]),
            busy={int(rank): float(value) for rank, value in data["busy"].items()},
        )

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Timeline:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


def _per_stage(name: str, cost: Cost, stages: int) -> list[float]:
    if isinstance(cost, (int, float)) and not isinstance(cost, bool):
        values = [float(cost)] * stages
    else:
        values = [float(c) for c in cost]
        if len(values) != stages:
            raise ValueError(f"{name} has {len(values)} entries but the schedule has {stages} stages; give one each")
    if any(v < 0 for v in values):
        raise ValueError(f"{name} must be >= 0, got {cost!r}")
    return values


class _Intervals(Mapping[int, list[Interval]]):
    """Rank -> its :class:`Interval` list, made on first access: the planner reads only the step time, and making an
    object per action of thousands of schedules would take a good share of a search."""

    def __init__(self, compiled: CompiledSchedule, start: list[float], end: list[float]) -> None:
        self._compiled, self._start, self._end = compiled, start, end
        self._made: dict[int, list[Interval]] = {}

    def __getitem__(self, rank: int) -> list[Interval]:
        if rank not in self._made:
            c = self._compiled
            if not 0 <= rank < len(c.ids):
                raise KeyError(rank)
            self._made[rank] = [Interval(self._start[a], self._end[a], c.actions[a]) for a in c.ids[rank]]
        return self._made[rank]

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self._compiled.ids)))

    def __len__(self) -> int:
        return len(self._compiled.ids)


def _links(name: str, links: Sequence[tuple[float, float]] | None, default: float, stages: int) -> list[tuple[float,
                                                                                                           float]]:
    if links is None:
        return [(default, 0.0)] * (stages - 1)
    values = [(float(lat), float(occ)) for lat, occ in links]
    if len(values) != stages - 1:
        raise ValueError(f"{name} has {len(values)} entries but the schedule has {stages - 1} stage boundaries")
    if any(lat < 0 or occ < 0 for lat, occ in values):
        raise ValueError(f"{name} must hold (latency, occupancy) pairs >= 0, got {links!r}")
    return values


def simulate(
    schedule: Schedule | CompiledSchedule,
    *,
    forward_cost: Cost,
    backward_cost: Cost,
    weight_cost: Cost | None = None,
    comm_cost: float = 0.0,
    forward_links: Sequence[tuple[float, float]] | None = None,
    backward_links: Sequence[tuple[float, float]] | None = None,
    send_overhead: float = 0.0,
    recv_overhead: float = 0.0,
    start: Sequence[float] | None = None,
    tail: Sequence[float] | None = None,
    tail_work: Sequence[float] | None = None,
    sharing: Sharing | None = None,
) -> Timeline:
    """Run ``schedule`` on paper and return its :class:`Timeline`.

    ``forward_cost`` and ``backward_cost`` (the full backward, B) are per stage. A split backward costs
    ``I = backward - weight`` and ``W = weight``; without ``weight_cost`` the split is even (``I = W = backward / 2``).
    An action starts when its rank is free and its inputs are ready; an input from another rank arrives ``comm_cost``
    after it was produced (compute-only schedules) or sent (schedules with SEND/RECV actions).

    The cost model beyond that (all optional): ``forward_links[j] = (latency, occupancy)`` for the activation from
    stage ``j`` to ``j + 1`` and ``backward_links[j]`` for its gradient (default ``(comm_cost, 0)``; unused between
    stages on one rank); ``send_overhead`` / ``recv_overhead`` per SEND / RECV action; rank ``r`` starts at
    ``start[r]`` and works ``tail[r]`` fixed seconds and then ``tail_work[r]`` of compute after its last action;
    ``sharing``: ranks slowing each other down (see :mod:`stagewise.schedule._engine`).
    Raises :class:`ScheduleError` if the schedule does not validate.
    """
    compiled = schedule if isinstance(schedule, CompiledSchedule) else compile_schedule(schedule)
    raw = compiled.raw
    stages, ranks = raw.stages, raw.ranks
    fwd = _per_stage("forward_cost", forward_cost, stages)
    bwd = _per_stage("backward_cost", backward_cost, stages)
    wgt = [b / 2 for b in bwd] if weight_cost is None else _per_stage("weight_cost", weight_cost, stages)
    for stage, (b, w) in enumerate(zip(bwd, wgt)):
        if w > b:
            raise ValueError(f"weight_cost ({w}) exceeds backward_cost ({b}) at stage {stage}: W is part of B")
    for name, value in (("comm_cost", comm_cost), ("send_overhead", send_overhead), ("recv_overhead", recv_overhead)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    for name, per_rank in (("start", start), ("tail", tail), ("tail_work", tail_work)):
        if per_rank is not None and len(per_rank) != ranks:
            raise ValueError(f"{name} has {len(per_rank)} entries but the schedule has {ranks} ranks; give one each")
    if sharing is not None and len(sharing.pool) != ranks:
        raise ValueError(f"sharing has {len(sharing.pool)} ranks but the schedule has {ranks}; give one each")
    fl = _links("forward_links", forward_links, float(comm_cost), stages)
    bl = _links("backward_links", backward_links, float(comm_cost), stages)
    links = [pair for j in range(stages - 1) for pair in (fl[j], bl[j])]
    # code -> cost per stage: F, B, I, W, SEND, RECV
    table = np.array([fwd, bwd, [b - w for b, w in zip(bwd, wgt)], wgt, [float(send_overhead)] * stages,
                      [float(recv_overhead)] * stages], dtype=np.float64).reshape(-1)
    durations = table[compiled.cost_index].tolist()
    before = after = None
    if compiled.folded:  # its RECVs and SENDs are paid by the compute actions they stand next to
        takes, gives = compiled.crossing
        before = np.where(takes, float(recv_overhead), 0.0).tolist()
        after = np.where(gives, float(send_overhead), 0.0).tolist()
    result = run(compiled, durations=durations, links=links, before=before, after=after, start=start, tail=tail,
                 tail_work=tail_work, sharing=sharing)
    intervals = _Intervals(compiled, result.start, result.end)
    compute = compiled.computes
    busy = {rank: sum(itertools.compress(durations[ids.start:ids.stop], compute[ids.start:ids.stop]))
            for rank, ids in enumerate(compiled.ids)}
    span = max(result.pipeline_end, default=0.0)
    step_time = max(result.finish, default=0.0)
    bubble = 1.0 - sum(busy.values()) / (ranks * span) if span > 0 else 0.0
    return Timeline(schedule=raw.name, intervals=intervals, step_time=step_time, bubble_fraction=bubble, busy=busy)


@functools.lru_cache(maxsize=64)
def build_compiled(name: str, *, ranks: int, microbatches: int, stages_per_rank: int = 1,
                   folded: bool = False) -> CompiledSchedule:
    """The schedule the runtime runs for ``name`` (``add_communication(build(...))``), compiled once. Made from keys
    and not re-checked (:func:`~stagewise.schedule.compile_built`); its :attr:`~CompiledSchedule.schedule` and actions
    are made when first read.

    ``folded=True``: the same schedule with its SEND/RECV actions folded into the compute actions next to them
    (:attr:`CompiledSchedule.folded`): :func:`simulate` gives the very step time, bubble and compute intervals with a
    third of the actions to run (what the planner simulates its layouts on); its timeline lists compute actions only.
    """
    raw = build_raw(name, ranks=ranks, microbatches=microbatches, stages_per_rank=stages_per_rank)
    return compile_built(raw, folded=True) if folded else compile_built(add_communication_raw(raw))
