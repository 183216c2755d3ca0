"""Predict a schedule's timeline from per-stage costs, without processes; and count in-flight activations."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from ._actions import Action, Schedule
from ._validate import execute

__all__ = ["Interval", "Timeline", "peak_activations", "simulate"]

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
    intervals: dict[int, list[Interval]]
    """Rank -> (start, end, action) for each of its actions, in list order; transfers take no time on their rank
    (a RECV sits at the moment its data arrived; the wait before it is idle time)."""
    step_time: float
    """When the last action ended (the step starts at 0)."""
    bubble_fraction: float
    """Idle share of all ranks' time: ``1 - sum(busy) / (ranks * step_time)``."""
    busy: dict[int, float]
    """Rank -> seconds (or cost units) spent in compute actions."""

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


def simulate(
    schedule: Schedule,
    *,
    forward_cost: Cost,
    backward_cost: Cost,
    weight_cost: Cost | None = None,
    comm_cost: float = 0.0,
) -> Timeline:
    """Run ``schedule`` on paper and return its :class:`Timeline`.

    ``forward_cost`` and ``backward_cost`` (the full backward, B) are per stage. A split backward costs
    ``I = backward - weight`` and ``W = weight``; without ``weight_cost`` the split is even (``I = W = backward / 2``).
    An action starts when its rank is free and its inputs are ready; an input from another rank arrives ``comm_cost``
    after it was produced (compute-only schedules) or sent (schedules with SEND/RECV actions).
    Raises :class:`ScheduleError` if the schedule does not validate.
    """
    stages = schedule.stages
    fwd = _per_stage("forward_cost", forward_cost, stages)
    bwd = _per_stage("backward_cost", backward_cost, stages)
    wgt = [b / 2 for b in bwd] if weight_cost is None else _per_stage("weight_cost", weight_cost, stages)
    for stage, (b, w) in enumerate(zip(bwd, wgt)):
        if w > b:
            raise ValueError(f"weight_cost ({w}) exceeds backward_cost ({b}) at stage {stage}: W is part of B")
    if not isinstance(comm_cost, (int, float)) or comm_cost < 0:
        raise ValueError(f"comm_cost must be a float >= 0, got {comm_cost!r}")
    costs = {"F": fwd, "B": bwd, "I": [b - w for b, w in zip(bwd, wgt)], "W": wgt}

    def duration(action: Action) -> float:
        return costs[action.kind][action.stage] if action.is_compute else 0.0

    times = execute(schedule, duration=duration, latency=float(comm_cost))
    intervals = {
        rank: [Interval(*times[action], action) for action in actions] for rank, actions in schedule.actions.items()
    }
    busy = {
        rank: sum(iv.end - iv.start for iv in ivs if iv.action.is_compute) for rank, ivs in intervals.items()
    }
    step_time = max((iv.end for ivs in intervals.values() for iv in ivs), default=0.0)
    bubble = 1.0 - sum(busy.values()) / (schedule.ranks * step_time) if step_time > 0 else 0.0
    return Timeline(
        schedule=schedule.name, intervals=intervals, step_time=step_time, bubble_fraction=bubble, busy=busy
    )


def peak_activations(schedule: Schedule) -> dict[int, int]:
    """Stage -> the most microbatches whose F has run but whose B (or I) has not, at any point of its rank's list.

    GPipe keeps all M; 1F1B keeps ``min(M, P - stage)``. (A W needs only what its I kept, so it is not counted.)
    """
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
