"""The schedule IR: one :class:`Action` per unit of work, a :class:`Schedule` of per-rank action lists.

An action names a stage, a microbatch and what to do with them. Its text form is compact, like
``torch.distributed.pipelining``: ``"1F0"`` is stage 1's forward of microbatch 0, ``"0B3"`` a full backward,
``"2I1"``/``"2W1"`` the input-gradient and weight-gradient halves of a split backward, and ``"1SEND_F0"`` /
``"2RECV_B3"`` the point-to-point transfers that :func:`~stagewise.schedule.add_communication` inserts.

A comm action's stage is the stage *on the rank that runs it*: ``SEND_F(s, m)`` ships stage ``s``'s output to stage
``s + 1``, where ``RECV_F(s + 1, m)`` takes it; ``SEND_B(s, m)`` ships stage ``s``'s input gradient to stage ``s - 1``,
where ``RECV_B(s - 1, m)`` takes it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, Literal, get_args

from .._errors import StagewiseError

__all__ = [
    "COMM_KINDS",
    "COMPUTE_KINDS",
    "Action",
    "ActionKind",
    "Key",
    "RawSchedule",
    "Schedule",
    "ScheduleError",
]

ActionKind = Literal["F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B"]
"""What an action does: forward, full backward, backward-for-input, weight-gradient, or a transfer."""

COMPUTE_KINDS: frozenset[str] = frozenset({"F", "B", "I", "W"})
"""Kinds that run stage code."""
COMM_KINDS: frozenset[str] = frozenset({"SEND_F", "RECV_F", "SEND_B", "RECV_B"})
"""Kinds that move an activation (``_F``) or an input gradient (``_B``) between ranks."""

_ALL_KINDS = get_args(ActionKind)
# Longest kinds first so "SEND_F" is not read as "S" + ...; stage and microbatch are plain non-negative integers.
_ACTION_RE = re.compile(r"^(\d+)(" + "|".join(sorted(_ALL_KINDS, key=len, reverse=True)) + r")(\d+)$")


class ScheduleError(StagewiseError, ValueError):
    """A schedule that cannot run: names the rank, the step (index in that rank's list), the action and why.

    ``str(error)`` starts with ``"rank R, step K, action A: reason"`` and, when the schedule is known, ends with the
    rank-by-step grid around the offending step, marked ``>A<``.
    """

    def __init__(
        self,
        reason: str,
        *,
        rank: int | None = None,
        step: int | None = None,
        action: Action | None = None,
        schedule: Schedule | None = None,
    ) -> None:
        self.reason = reason
        self.rank = rank
        self.step = step
        self.action = action
        where = []
        if rank is not None:
            where.append(f"rank {rank}")
        if step is not None:
            where.append(f"step {step}")
        if action is not None:
            where.append(f"action {action}")
        message = f"{', '.join(where)}: {reason}" if where else reason
        if schedule is not None and schedule.num_steps:
            mark = (rank, step) if rank is not None and step is not None else None
            message += f"\nschedule {schedule.name!r}:\n" + schedule.grid(mark=mark, window=6)
        super().__init__(message)


@dataclasses.dataclass(frozen=True, slots=True)
class Action:
    """One unit of work on one rank: ``kind`` of ``stage`` for ``microbatch``; prints as ``"1F0"``."""

    kind: ActionKind
    """``F``, ``B``, ``I``, ``W`` (compute) or ``SEND_F``, ``RECV_F``, ``SEND_B``, ``RECV_B`` (transfer)."""
    stage: int
    """Global stage index (0 .. stages-1); for a transfer, the stage on the rank that runs it."""
    microbatch: int
    """Microbatch index (0 .. microbatches-1)."""

    def __post_init__(self) -> None:
        if self.kind not in _ALL_KINDS:
            raise ValueError(f"Action.kind must be one of {', '.join(_ALL_KINDS)}, got {self.kind!r}")
        # One cheap test for the common case (builders make hundreds of thousands of actions), the full one on failure.
        if type(self.stage) is int and type(self.microbatch) is int and self.stage >= 0 and self.microbatch >= 0:
            return
        for field in ("stage", "microbatch"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Action.{field} must be a non-negative int, got {value!r}")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Parse the text form (``"1F0"``, ``"2RECV_B3"``); inverse of ``str(action)``."""
        match = _ACTION_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(
                f"cannot parse action {text!r}: expected <stage><kind><microbatch> such as '1F0', '0B3' or '2SEND_F1', "
                f"with kind one of {', '.join(_ALL_KINDS)}"
            )
        stage, kind, microbatch = match.groups()
        return cls(kind, int(stage), int(microbatch))  # type: ignore[arg-type]

    @property
    def is_compute(self) -> bool:
        """True for ``F``/``B``/``I``/``W``."""
        return self.kind in COMPUTE_KINDS

    @property
    def is_comm(self) -> bool:
        """True for ``SEND_*``/``RECV_*``."""
        return self.kind in COMM_KINDS


@dataclasses.dataclass(kw_only=True)
class Schedule:
    """A pipeline schedule as data: for each rank, the actions it runs, in order.

    Stage ``s`` lives on rank ``s % ranks``, so rank ``r`` holds stages ``r, r + ranks, r + 2 * ranks, ...``.
    Construction checks only the sizes; :func:`~stagewise.schedule.validate` checks that the actions can run.
    """

    name: str
    """Which builder made it (``"gpipe"``, ``"1f1b"``, ...) or any label; shown in errors and logs."""
    ranks: int
    """Pipeline ranks (processes) P."""
    stages: int
    """Stages S in the chain; a multiple of ``ranks`` (``stages // ranks`` virtual stages per rank)."""
    microbatches: int
    """Microbatches M per step."""
    actions: dict[int, list[Action]]
    """Rank -> its actions in execution order. Ranks left out get an empty list."""

    def __post_init__(self) -> None:
        for field in ("ranks", "stages", "microbatches"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Schedule.{field} must be an int >= 1, got {value!r}")
        if self.stages % self.ranks:
            raise ValueError(
                f"Schedule.stages ({self.stages}) must be a multiple of Schedule.ranks ({self.ranks}): "
                "every rank holds the same number of stages"
            )
        extra = sorted(set(self.actions) - set(range(self.ranks)), key=str)
        if extra:
            raise ValueError(f"Schedule.actions has ranks {extra} outside 0..{self.ranks - 1}; set ranks accordingly")
        for rank, actions in self.actions.items():
            for step, action in enumerate(actions):
                if not isinstance(action, Action):
                    raise ValueError(
                        f"Schedule.actions[{rank}][{step}] must be an Action, got {action!r} "
                        "(use Action.parse for text or Schedule.from_dict)"
                    )
        # Own the lists: a builder's caller may keep mutating what it passed in.
        self.actions = {rank: list(self.actions.get(rank, [])) for rank in range(self.ranks)}

    @property
    def stages_per_rank(self) -> int:
        """Virtual stages V held by each rank."""
        return self.stages // self.ranks

    @property
    def num_steps(self) -> int:
        """Length of the longest rank's action list."""
        return max((len(actions) for actions in self.actions.values()), default=0)

    @property
    def has_communication(self) -> bool:
        """True when any rank has SEND/RECV actions (i.e. :func:`add_communication` ran)."""
        return any(action.is_comm for actions in self.actions.values() for action in actions)

    def rank_of(self, stage: int) -> int:
        """The rank holding ``stage``."""
        return stage % self.ranks

    def stages_of(self, rank: int) -> list[int]:
        """The stages held by ``rank``, lowest first."""
        return list(range(rank, self.stages, self.ranks))

    # -- serialisation ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; actions in their text form, rank keys as strings."""
        return {
            "name": self.name,
            "ranks": self.ranks,
            "stages": self.stages,
            "microbatches": self.microbatches,
            "actions": {str(rank): [str(a) for a in actions] for rank, actions in self.actions.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`; action entries may be text (``"1F0"``) or :class:`Action`."""
        missing = {"name", "ranks", "stages", "microbatches", "actions"} - set(data)
        if missing:
            raise ValueError(f"schedule data lacks {sorted(missing)}")
        actions = {
            int(rank): [a if isinstance(a, Action) else Action.parse(a) for a in items]
            for rank, items in data["actions"].items()
        }
        return cls(
            name=data["name"],
            ranks=data["ranks"],
            stages=data["stages"],
            microbatches=data["microbatches"],
            actions=actions,
        )

    def to_json(self, *, indent: int | None = None) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    # -- display ---------------------------------------------------------------------------------------------------

    def grid(self, *, mark: tuple[int, int] | None = None, window: int | None = None) -> str:
        """Rank-by-step table (one row per rank, one column per list index), e.g.::

            step     0     1     2     3
            rank 0   0F0   0F1   0B0   0B1
            rank 1   1F0  >1F1<  1B0   1B1

        ``mark=(rank, step)`` brackets that cell with ``>...<``. With ``window`` and ``mark``, only steps within
        ``window`` of the marked step are shown (for error messages on long schedules).
        """
        first, last = 0, self.num_steps
        if mark is not None and window is not None:
            first, last = max(0, mark[1] - window), min(self.num_steps, mark[1] + window + 1)
        width = max([len(str(a)) for acts in self.actions.values() for a in acts[first:last]] + [len(str(last))])
        label = max(len("step"), len(f"rank {self.ranks - 1}"))

        def cell(text: str, marked: bool) -> str:
            return f"{f'>{text}<' if marked else text:^{width + 2}}"

        lines = [f"{'step':<{label}} " + "".join(cell(str(step), False) for step in range(first, last))]
        for rank in range(self.ranks):
            acts = self.actions[rank]
            cells = [
                cell(str(acts[step]) if step < len(acts) else "", mark == (rank, step)) for step in range(first, last)
            ]
            lines.append(f"{f'rank {rank}':<{label}} " + "".join(cells))
        return "\n".join(line.rstrip() for line in lines)


Key = tuple[str, int, int]
"""An action's fields as a plain tuple ``(kind, stage, microbatch)``: what builders and the compiler work on."""


@dataclasses.dataclass(frozen=True, slots=True)
class RawSchedule:
    """A :class:`Schedule` whose actions are :data:`Key` tuples, made without checks: what the builders write.

    The planner compiles thousands of builder schedules' actions per search, and an :class:`Action` object (a checked
    frozen dataclass) costs ten times a tuple; :meth:`to_schedule` makes the objects when someone looks at them.
    """

    name: str
    ranks: int
    stages: int
    microbatches: int
    actions: tuple[list[Key], ...]
    """Per rank (index), its keys in execution order."""

    @classmethod
    def of(cls, schedule: Schedule) -> RawSchedule:
        """The keys of ``schedule``'s actions."""
        return cls(schedule.name, schedule.ranks, schedule.stages, schedule.microbatches,
                   tuple([(a.kind, a.stage, a.microbatch) for a in schedule.actions[rank]]
                         for rank in range(schedule.ranks)))

    def to_schedule(self) -> Schedule:
        """The :class:`Schedule` of these keys (checks sizes and action fields)."""
        return Schedule(name=self.name, ranks=self.ranks, stages=self.stages, microbatches=self.microbatches,
                        actions={rank: [Action(*key) for key in keys]  # type: ignore[arg-type]
                                 for rank, keys in enumerate(self.actions)})
