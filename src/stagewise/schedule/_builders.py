"""Schedule builders: pure functions from (ranks, microbatches, ...) to a compute-only :class:`Schedule`.

Each schedule is written once, here, as the per-rank order of its compute actions; a runtime interprets the list and
never re-derives the order. Communication is a separate pass (:func:`add_communication`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Literal, get_args

from ._actions import Key, RawSchedule, Schedule

__all__ = [
    "SCHEDULE_NAMES",
    "ScheduleName",
    "add_communication",
    "add_communication_raw",
    "build",
    "build_raw",
    "gpipe",
    "interleaved_1f1b",
    "one_f_one_b",
    "zero_bubble",
]

logger = logging.getLogger(__name__)

ScheduleName = Literal["gpipe", "1f1b", "interleaved", "zb"]
"""A schedule :func:`build` makes; the one list of names (the CLI, ``TrainConfig``, ``Plan`` and the planner use it)."""

SCHEDULE_NAMES: tuple[ScheduleName, ...] = get_args(ScheduleName)
"""The names of :data:`ScheduleName`, in its order."""


def _check_sizes(*, ranks: int, microbatches: int, stages_per_rank: int = 1) -> None:
    for name, value in (("ranks", ranks), ("microbatches", microbatches), ("stages_per_rank", stages_per_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _assemble(
    name: str, *, ranks: int, stages: int, microbatches: int, rank_actions: Callable[[int], list[Key]]
) -> RawSchedule:
    raw = RawSchedule(name, ranks, stages, microbatches, tuple(rank_actions(rank) for rank in range(ranks)))
    logger.debug("built %s schedule: ranks=%s stages=%s microbatches=%s", name, ranks, stages, microbatches)
    return raw


def gpipe(*, ranks: int, microbatches: int) -> Schedule:
    """GPipe: every rank runs all forwards, then all backwards (peak activations M per stage)."""
    return _gpipe(ranks=ranks, microbatches=microbatches).to_schedule()


def _gpipe(*, ranks: int, microbatches: int) -> RawSchedule:
    _check_sizes(ranks=ranks, microbatches=microbatches)

    def rank_actions(rank: int) -> list[Key]:
        return [("F", rank, m) for m in range(microbatches)] + [("B", rank, m) for m in range(microbatches)]

    return _assemble("gpipe", ranks=ranks, stages=ranks, microbatches=microbatches, rank_actions=rank_actions)


def _one_f_one_b_order(*, warmup: int, total: int) -> list[tuple[str, int]]:
    """``warmup`` forwards, then forward/backward pairs, then the remaining backwards, as (kind, index) pairs.

    Indices count the rank's forward (and backward) work items in the order they are run; callers map an index to a
    (stage, microbatch).
    """
    warmup = min(warmup, total)
    order = [("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", warmup + k), ("B", k)]
    order += [("B", k) for k in range(total - warmup, total)]
    return order


def one_f_one_b(*, ranks: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): ``ranks - 1 - rank`` warmup forwards, then one-forward-one-backward, then cooldown.

    Same step time as GPipe, but stage ``r`` keeps at most ``min(M, P - r)`` activations alive instead of M.
    """
    return _one_f_one_b(ranks=ranks, microbatches=microbatches).to_schedule()


def _one_f_one_b(*, ranks: int, microbatches: int) -> RawSchedule:
    _check_sizes(ranks=ranks, microbatches=microbatches)

    def rank_actions(rank: int) -> list[Key]:
        return [(kind, rank, m) for kind, m in _one_f_one_b_order(warmup=ranks - 1 - rank, total=microbatches)]

    return _assemble("1f1b", ranks=ranks, stages=ranks, microbatches=microbatches, rank_actions=rank_actions)


def interleaved_1f1b(*, ranks: int, stages_per_rank: int, microbatches: int) -> Schedule:
    """Megatron-style interleaved 1F1B: rank r holds stages r, r+P, ...; microbatches go through each of the rank's
    stages in groups of P, which divides the pipeline bubble by about ``stages_per_rank``.

    Requires ``microbatches % ranks == 0``. With ``stages_per_rank=1`` this is plain 1F1B.
    """
    return _interleaved_1f1b(ranks=ranks, stages_per_rank=stages_per_rank, microbatches=microbatches).to_schedule()


def _interleaved_1f1b(*, ranks: int, stages_per_rank: int, microbatches: int) -> RawSchedule:
    _check_sizes(ranks=ranks, microbatches=microbatches, stages_per_rank=stages_per_rank)
    if microbatches % ranks:
        raise ValueError(
            f"interleaved 1F1B sends microbatches through each rank's stages in groups of ranks={ranks}, so "
            f"microbatches must be a multiple of {ranks}, got microbatches={microbatches}; use e.g. microbatches="
            f"{(microbatches // ranks + 1) * ranks} or the '1f1b' schedule"
        )
    if stages_per_rank == 1:
        # Megatron's warmup formula (below) doubles 1F1B's warmup even with one stage per rank; that only costs memory.
        return _one_f_one_b(ranks=ranks, microbatches=microbatches)
    per_round = ranks * stages_per_rank  # forward work items per group of `ranks` microbatches
    total = microbatches * stages_per_rank

    def stage_and_mb(rank: int, k: int, *, forward: bool) -> tuple[int, int]:
        chunk = (k % per_round) // ranks
        if not forward:
            chunk = stages_per_rank - 1 - chunk  # backward visits the rank's stages last-first
        return chunk * ranks + rank, (k // per_round) * ranks + k % ranks

    def rank_actions(rank: int) -> list[Key]:
        # Enough warmup forwards that the first backward has come back from the last stage when the 1F1B phase starts.
        warmup = (stages_per_rank - 1) * ranks + 2 * (ranks - 1 - rank)
        return [(kind, *stage_and_mb(rank, k, forward=kind == "F"))
                for kind, k in _one_f_one_b_order(warmup=warmup, total=total)]

    return _assemble(
        "interleaved",
        ranks=ranks,
        stages=ranks * stages_per_rank,
        microbatches=microbatches,
        rank_actions=rank_actions,
    )


def zero_bubble(*, ranks: int, microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with every backward split into I (input gradient, on the critical path) and W (weight gradient).

    Rank r runs ``P - r`` warmup forwards, then I/F pairs; it defers the W of its first r microbatches, so the input
    gradients travel upstream sooner, and runs them at the end, where 1F1B would leave it idle. Peak activations per
    stage stay those of 1F1B. W of a (stage, microbatch) always follows its I.
    """
    return _zero_bubble(ranks=ranks, microbatches=microbatches).to_schedule()


def _zero_bubble(*, ranks: int, microbatches: int) -> RawSchedule:
    _check_sizes(ranks=ranks, microbatches=microbatches)

    def rank_actions(rank: int) -> list[Key]:
        deferred = min(rank, microbatches)
        actions: list[Key] = []
        for kind, m in _one_f_one_b_order(warmup=ranks - 1 - rank, total=microbatches):
            if kind == "F":
                actions.append(("F", rank, m))
            else:
                actions.append(("I", rank, m))
                if m >= deferred:
                    actions.append(("W", rank, m))
        return actions + [("W", rank, m) for m in range(deferred)]

    return _assemble("zb", ranks=ranks, stages=ranks, microbatches=microbatches, rank_actions=rank_actions)


def build(name: ScheduleName | str, *, ranks: int, microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """Build a schedule by name: ``"gpipe"``, ``"1f1b"``, ``"interleaved"`` or ``"zb"``."""
    return build_raw(name, ranks=ranks, microbatches=microbatches, stages_per_rank=stages_per_rank).to_schedule()


def build_raw(name: ScheduleName | str, *, ranks: int, microbatches: int, stages_per_rank: int = 1) -> RawSchedule:
    """:func:`build`, as keys (no :class:`Action` objects)."""
    if name == "interleaved":
        return _interleaved_1f1b(ranks=ranks, stages_per_rank=stages_per_rank, microbatches=microbatches)
    builders: dict[str, Callable[..., RawSchedule]] = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "zb": _zero_bubble}
    if name not in builders:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if stages_per_rank != 1:
        raise ValueError(
            f"stages_per_rank={stages_per_rank} needs the 'interleaved' schedule; {name!r} runs one stage per rank"
        )
    return builders[name](ranks=ranks, microbatches=microbatches)


def add_communication(schedule: Schedule) -> Schedule:
    """Insert the point-to-point transfers a compute-only schedule needs; returns a new schedule.

    A RECV goes just before the compute that consumes it, a SEND just after the compute that produces it:
    ``RECV_F(s)`` before ``F(s)`` and ``SEND_F(s)`` after it when stage ``s - 1`` / ``s + 1`` is on another rank;
    ``RECV_B(s)`` before ``B``/``I`` of ``s`` and ``SEND_B(s)`` after it when stage ``s + 1`` / ``s - 1`` is on
    another rank (``I`` carries the input gradient; ``W`` sends nothing). Stages on the same rank pass values locally.
    """
    if schedule.has_communication:
        raise ValueError(f"schedule {schedule.name!r} already has SEND/RECV actions; add_communication runs once")
    return add_communication_raw(RawSchedule.of(schedule)).to_schedule()


def add_communication_raw(schedule: RawSchedule) -> RawSchedule:
    """:func:`add_communication` on keys, for a schedule without transfers."""
    S, P = schedule.stages, schedule.ranks
    # Per stage: is the previous / next stage on another rank (a lookup per action; big schedules have many).
    before = [s > 0 and (s - 1) % P != s % P for s in range(S)]
    after = [s + 1 < S and (s + 1) % P != s % P for s in range(S)]
    actions: list[list[Key]] = []
    for compute in schedule.actions:
        out: list[Key] = []
        for key in compute:
            kind, s, m = key
            if s >= S:  # no such stage: validate() reports it
                out.append(key)
            elif kind == "F":
                if before[s]:
                    out.append(("RECV_F", s, m))
                out.append(key)
                if after[s]:
                    out.append(("SEND_F", s, m))
            elif kind in ("B", "I"):
                if after[s]:
                    out.append(("RECV_B", s, m))
                out.append(key)
                if before[s]:
                    out.append(("SEND_B", s, m))
            else:
                out.append(key)
        actions.append(out)
    return dataclasses.replace(schedule, actions=tuple(actions))
