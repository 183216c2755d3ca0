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

from .._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "Action": "._actions",
    "ActionKind": "._actions",
    "add_communication": "._builders",
    "build": "._builders",
    "build_compiled": "._simulate",
    "COMM_KINDS": "._actions",
    "compile_schedule": "._validate",
    "CompiledSchedule": "._engine",
    "COMPUTE_KINDS": "._actions",
    "Cost": "._simulate",
    "gpipe": "._builders",
    "interleaved_1f1b": "._builders",
    "Interval": "._simulate",
    "one_f_one_b": "._builders",
    "peak_activations": "._peaks",
    "Schedule": "._actions",
    "SCHEDULE_NAMES": "._builders",
    "ScheduleError": "._actions",
    "ScheduleName": "._builders",
    "Sharing": "._engine",
    "simulate": "._simulate",
    "Timeline": "._simulate",
    "validate": "._validate",
    "zero_bubble": "._builders",
})
