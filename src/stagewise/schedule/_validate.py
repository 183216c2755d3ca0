"""Check that a schedule can run, and run it on paper.

:func:`validate` checks, in order: every action names an existing stage and microbatch on the rank holding that stage;
no action appears twice; every stage runs F and either B or I+W once per microbatch (and, once communication was
added, every needed SEND/RECV is there and no other, and between two ranks the RECVs come in the order of the
SENDs, since that is how messages are matched); each rank's list puts an action after the ones on the same rank
it needs; and finally the ranks can all reach the end, by executing the lists in order where an action waits until
what it needs has run (a RECV waits for its SEND; a SEND never waits). The first failure raises
:class:`ScheduleError` naming rank, step, action and reason.

:func:`execute` is that last check with clocks: the same engine gives :func:`~stagewise.schedule.simulate` its
timeline, so the simulator and the validator cannot disagree about what may run when.
"""

from __future__ import annotations

from collections.abc import Callable

from ._actions import Action, Schedule, ScheduleError

__all__ = ["validate"]

_Position = tuple[int, int]  # (rank, step)


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` if ``schedule`` is incomplete, out of order or deadlocks; return None if it runs."""
    execute(schedule, duration=lambda action: 0.0, latency=0.0)


def execute(
    schedule: Schedule, *, duration: Callable[[Action], float], latency: float
) -> dict[Action, tuple[float, float]]:
    """Validate ``schedule`` and run it on paper: each rank runs its list in order, an action starting once its rank is
    free and what it needs has finished (``latency`` more when that ran on another rank). Returns action -> (start,
    end)."""
    index = _check_actions(schedule)
    communicated = schedule.has_communication
    if communicated:
        _check_transfers(schedule, index)
    _check_local_order(schedule, index, communicated)
    return _run(schedule, index, communicated, duration=duration, latency=latency)


# -- which actions exist -----------------------------------------------------------------------------------------------


def _check_actions(schedule: Schedule) -> dict[Action, _Position]:
    """Range, placement, duplicate and completeness checks; returns where each action sits."""
    index: dict[Action, _Position] = {}
    for rank, actions in schedule.actions.items():
        for step, action in enumerate(actions):
            reason: str | None = None
            if action.stage >= schedule.stages:
                reason = f"stage {action.stage} does not exist (stages={schedule.stages})"
            elif action.microbatch >= schedule.microbatches:
                reason = f"microbatch {action.microbatch} does not exist (microbatches={schedule.microbatches})"
            elif schedule.rank_of(action.stage) != rank:
                owner = schedule.rank_of(action.stage)
                reason = f"stage {action.stage} lives on rank {owner} (stage s is on rank s % {schedule.ranks})"
            elif action in index:
                reason = f"duplicate action: {action} already runs at rank {index[action][0]}, step {index[action][1]}"
            if reason is not None:
                raise ScheduleError(reason, rank=rank, step=step, action=action, schedule=schedule)
            index[action] = (rank, step)

    for stage in range(schedule.stages):
        rank = schedule.rank_of(stage)
        for mb in range(schedule.microbatches):
            f, b, i, w = (Action(kind, stage, mb) for kind in ("F", "B", "I", "W"))  # type: ignore[arg-type]
            if f not in index:
                raise ScheduleError(
                    "missing action: every stage runs F once per microbatch", rank=rank, action=f, schedule=schedule
                )
            if b in index and (i in index or w in index):
                other = i if i in index else w
                raise ScheduleError(
                    f"both a full backward {b} and a split one ({other}): run either B or I + W",
                    rank=rank,
                    step=index[other][1],
                    action=other,
                    schedule=schedule,
                )
            if b not in index and i not in index:
                reason = f"missing backward: expected {b}, or {i} and {w}" if w not in index else f"{w} without {i}"
                step = index[w][1] if w in index else None
                raise ScheduleError(reason, rank=rank, step=step, action=w if w in index else b, schedule=schedule)
            if i in index and w not in index:
                raise ScheduleError(
                    f"missing action: the weight gradient of {i} (step {index[i][1]}) never runs",
                    rank=rank,
                    action=w,
                    schedule=schedule,
                )
    return index


def _needed_transfers(schedule: Schedule) -> set[Action]:
    """The SEND/RECV actions a communicated schedule must hold: one pair per cross-rank edge and direction."""

    def remote(stage: int, other: int) -> bool:
        return 0 <= other < schedule.stages and schedule.rank_of(other) != schedule.rank_of(stage)

    needed: set[Action] = set()
    for stage in range(schedule.stages):
        for mb in range(schedule.microbatches):
            if remote(stage, stage + 1):  # activation goes down, its gradient comes back
                needed |= {Action("SEND_F", stage, mb), Action("RECV_F", stage + 1, mb)}
                needed |= {Action("SEND_B", stage + 1, mb), Action("RECV_B", stage, mb)}
    return needed


def _check_transfers(schedule: Schedule, index: dict[Action, _Position]) -> None:
    needed = _needed_transfers(schedule)
    for action, (rank, step) in sorted(index.items(), key=lambda item: item[1]):
        if action.is_comm and action not in needed:
            raise ScheduleError(
                "unexpected transfer: the neighbouring stage does not exist or is on the same rank (values between "
                "stages on one rank are passed locally)",
                rank=rank,
                step=step,
                action=action,
                schedule=schedule,
            )
    missing = sorted(needed - set(index), key=lambda a: (a.stage, a.microbatch, a.kind))
    if missing:
        action, peer = missing[0], _peer(missing[0]).stage
        raise ScheduleError(
            f"missing transfer: stage {action.stage} exchanges with stage {peer} on rank {schedule.rank_of(peer)}",
            rank=schedule.rank_of(action.stage),
            action=action,
            schedule=schedule,
        )
    # Messages between two ranks are matched in the order they were sent (as a runtime without tags would match them):
    # the k-th RECV on rank b from rank a must be for the k-th SEND on rank a to rank b.
    sends: dict[tuple[int, int], list[Action]] = {}
    for rank, actions in schedule.actions.items():
        for action in actions:
            if action.kind in ("SEND_F", "SEND_B"):
                sends.setdefault((rank, schedule.rank_of(_peer(action).stage)), []).append(action)
    received: dict[tuple[int, int], int] = {}
    for rank, actions in schedule.actions.items():
        for step, action in enumerate(actions):
            if action.kind not in ("RECV_F", "RECV_B"):
                continue
            channel = (schedule.rank_of(_peer(action).stage), rank)
            k = received.get(channel, 0)
            received[channel] = k + 1
            arriving = sends[channel][k]
            if arriving != _peer(action):
                raise ScheduleError(
                    f"out-of-order transfer: this is receive #{k} from rank {channel[0]}, which gets that rank's send "
                    f"#{k}, {arriving} (step {index[arriving][1]}), not {_peer(action)}; messages between two ranks "
                    "arrive in the order they were sent, so order the RECVs like the SENDs",
                    rank=rank,
                    step=step,
                    action=action,
                    schedule=schedule,
                )


def _peer(action: Action) -> Action:
    """The other end of a transfer: SEND_F(s) <-> RECV_F(s + 1), SEND_B(s) <-> RECV_B(s - 1)."""
    kind, stage, mb = action.kind, action.stage, action.microbatch
    peers = {"SEND_F": ("RECV_F", stage + 1), "RECV_F": ("SEND_F", stage - 1),
             "SEND_B": ("RECV_B", stage - 1), "RECV_B": ("SEND_B", stage + 1)}  # fmt: skip
    peer_kind, peer_stage = peers[kind]
    return Action(peer_kind, peer_stage, mb)  # type: ignore[arg-type]


# -- what each action waits for ----------------------------------------------------------------------------------------


def _dependencies(
    schedule: Schedule, action: Action, index: dict[Action, _Position], communicated: bool
) -> list[Action]:
    """Actions that must have finished before ``action`` starts (on this rank or another)."""
    s, m = action.stage, action.microbatch

    def backward(stage: int) -> Action:  # whichever of B / I produces stage's input gradient
        full = Action("B", stage, m)
        return full if full in index else Action("I", stage, m)

    def remote(other: int) -> bool:
        return schedule.rank_of(other) != schedule.rank_of(s)

    kind = action.kind
    if kind == "F":
        if s == 0:
            return []
        return [Action("RECV_F", s, m)] if communicated and remote(s - 1) else [Action("F", s - 1, m)]
    if kind in ("B", "I"):
        deps = [Action("F", s, m)]
        if s + 1 < schedule.stages:
            deps.append(Action("RECV_B", s, m) if communicated and remote(s + 1) else backward(s + 1))
        return deps
    if kind == "W":
        return [Action("I", s, m)]
    if kind == "SEND_F":
        return [Action("F", s, m)]
    if kind == "SEND_B":
        return [backward(s)]
    assert kind in ("RECV_F", "RECV_B"), kind
    return [_peer(action)]


def _order_reason(action: Action, dep: Action, dep_step: int) -> str:
    after = f"{dep} (step {dep_step} on this rank)"
    if action.kind == "F":
        what = "receives" if dep.kind == "RECV_F" else "computes"
        return f"forward of stage {action.stage} runs before {after}, which {what} its input"
    if action.kind in ("B", "I") and dep.kind == "F":
        return f"backward runs before its own forward {after}"
    if action.kind in ("B", "I"):
        what = "receives" if dep.kind == "RECV_B" else "computes"
        return f"backward of stage {action.stage} runs before {after}, which {what} its output gradient"
    if action.kind == "W":
        return f"weight gradient runs before {after}; W must follow its I"
    return f"sends before {after} has produced the value"


def _check_local_order(schedule: Schedule, index: dict[Action, _Position], communicated: bool) -> None:
    for rank, actions in schedule.actions.items():
        for step, action in enumerate(actions):
            for dep in _dependencies(schedule, action, index, communicated):
                dep_rank, dep_step = index[dep]
                if dep_rank == rank and dep_step > step:
                    raise ScheduleError(
                        _order_reason(action, dep, dep_step), rank=rank, step=step, action=action, schedule=schedule
                    )


# -- running the lists -------------------------------------------------------------------------------------------------


def _run(
    schedule: Schedule,
    index: dict[Action, _Position],
    communicated: bool,
    *,
    duration: Callable[[Action], float],
    latency: float,
) -> dict[Action, tuple[float, float]]:
    deps = {a: _dependencies(schedule, a, index, communicated) for a in index}
    times: dict[Action, tuple[float, float]] = {}
    clock = [0.0] * schedule.ranks
    next_step = [0] * schedule.ranks
    progress = True
    while progress:
        progress = False
        for rank, actions in schedule.actions.items():
            while next_step[rank] < len(actions):
                action = actions[next_step[rank]]
                if any(dep not in times for dep in deps[action]):
                    break  # blocked on another rank; come back after the others moved
                start = clock[rank]
                for dep in deps[action]:
                    start = max(start, times[dep][1] + (latency if index[dep][0] != rank else 0.0))
                times[action] = (start, start + duration(action))
                clock[rank] = times[action][1]
                next_step[rank] += 1
                progress = True

    stuck = [rank for rank in range(schedule.ranks) if next_step[rank] < len(schedule.actions[rank])]
    if stuck:
        waits = []
        for rank in stuck:
            action = schedule.actions[rank][next_step[rank]]
            missing = [d for d in deps[action] if d not in times]
            on = ", ".join(f"{d} (rank {index[d][0]}, step {index[d][1]})" for d in missing)
            waits.append(f"rank {rank} step {next_step[rank]} {action} waits for {on}")
        first = stuck[0]
        raise ScheduleError(
            "deadlock: no rank can make progress; " + "; ".join(waits),
            rank=first,
            step=next_step[first],
            action=schedule.actions[first][next_step[first]],
            schedule=schedule,
        )
    return times
