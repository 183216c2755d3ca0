"""Pipeline schedules as plain data: build, add communication, validate, simulate.

>>> from stagewise.schedule import build, add_communication, validate, simulate
>>> sched = add_communication(build("1f1b", ranks=2, microbatches=4))
>>> validate(sched)
>>> print(sched.grid())                                            # doctest: +SKIP
>>> round(simulate(sched, forward_cost=1.0, backward_cost=2.0).bubble_fraction, 3)
0.2

A :class:`Schedule` maps each rank to its list of :class:`Action` (``"1F0"``: stage 1, forward, microbatch 0); stage
``s`` lives on rank ``s % ranks``. Builders write each schedule once, as data; a runtime only interprets the lists.
"""

from ._actions import COMM_KINDS, COMPUTE_KINDS, Action, ActionKind, Schedule, ScheduleError
from ._builders import (
    SCHEDULE_NAMES,
    ScheduleName,
    add_communication,
    build,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble,
)
from ._engine import CompiledSchedule, Sharing
from ._peaks import peak_activations
from ._simulate import Cost, Interval, Timeline, build_compiled, simulate
from ._validate import compile_schedule, validate

__all__ = [
    "COMM_KINDS",
    "COMPUTE_KINDS",
    "SCHEDULE_NAMES",
    "Action",
    "ActionKind",
    "CompiledSchedule",
    "Cost",
    "Interval",
    "Schedule",
    "ScheduleError",
    "ScheduleName",
    "Sharing",
    "Timeline",
    "add_communication",
    "build",
    "build_compiled",
    "compile_schedule",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "peak_activations",
    "simulate",
    "validate",
    "zero_bubble",
]
