"""Check that a schedule can run, and run it on paper.

:func:`validate` checks, in order: every action names an existing stage and microbatch on the rank holding that stage;
no action appears twice; every stage runs F and either B or I+W once per microbatch (and, once communication was
added, every needed SEND/RECV is there and no other, and between two ranks the RECVs come in the order of the
SENDs, since that is how messages are matched); each rank's list puts an action after the ones on the same rank
it needs; and finally the ranks can all reach the end, by executing the lists in order where an action waits until
what it needs has run (a RECV waits for its SEND; a SEND never waits). The first failure raises
:class:`ScheduleError` naming rank, step, action and reason.

:func:`compile_schedule` does the checks and hands the engine (:mod:`._engine`) its tables; the deadlock check is
that engine run with zero costs, the same run that gives :func:`~stagewise.schedule.simulate` and the planner their
timelines, so the validator and the simulators cannot disagree about what may run when.
"""

from __future__ import annotations

import numpy as np

from ._actions import COMM_KINDS, Action, Key, RawSchedule, Schedule, ScheduleError
from ._engine import KIND_CODES, CompiledSchedule, run

__all__ = ["compile_built", "compile_schedule", "validate"]

_Position = tuple[int, int, int]  # (rank, step, number of the action in rank-major order)


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` if ``schedule`` is incomplete, out of order or deadlocks; return None if it runs."""
    compiled = compile_schedule(schedule)
    run(compiled, durations=[0.0] * len(compiled.code), links=[(0.0, 0.0)] * (2 * schedule.stages))


def compile_schedule(schedule: Schedule) -> CompiledSchedule:
    """Check ``schedule`` (all of :func:`validate` but the deadlock run) and turn it into the engine's tables."""
    raw = RawSchedule.of(schedule)
    keys = [key for rank_keys in raw.actions for key in rank_keys]
    index = _check_actions(schedule, keys)
    communicated = any(key[0] in COMM_KINDS for key in keys)
    if communicated:
        _check_transfers(schedule, keys, index)
    return _tables(raw, keys, communicated, given=schedule)


def compile_built(raw: RawSchedule, *, folded: bool = False) -> CompiledSchedule:
    """The engine's tables of a schedule our builders made, with communication added (or, ``folded``, compute-only
    and standing for it: :attr:`CompiledSchedule.folded`), without :func:`validate`'s checks: tests validate every
    builder's schedules (and compare these tables with :func:`compile_schedule`'s), and the checks would take most of
    the time of a plan search, which prices schedules of thousands of actions."""
    return _tables(raw, [key for rank_keys in raw.actions for key in rank_keys], not folded, folded=folded)


def _tables(raw: RawSchedule, keys: list[Key], communicated: bool, given: Schedule | None = None,
            folded: bool = False) -> CompiledSchedule:
    """The engine's tables of ``keys``, every action of ``raw`` in rank-major order (stage ``s`` on rank ``s % ranks``,
    each action once, every one it needs present). Raises :class:`ScheduleError` if an action comes before one it
    needs on its rank.

    What an action waits for and where its value goes depend on its (kind, stage) only, up to the choice between a B
    and an I present for its microbatch: a small table per (kind, stage), then array lookups for all the actions.
    """
    P, S, M, N = raw.ranks, raw.stages, raw.microbatches, len(keys)
    kinds = {kind: k for k, kind in enumerate(KIND_CODES)}
    # (kind, stage) of each action as one int ks = kind * S + stage; action (kind, s, m) is number[ks * M + m].
    kind_of, stage_of, mb_of = zip(*keys) if keys else ((), (), ())
    ks = np.fromiter(map(kinds.__getitem__, kind_of), np.int64, N) * S + np.array(stage_of, dtype=np.int64)
    mb = np.array(mb_of, dtype=np.int64)
    number = np.full(len(kinds) * S * M, -1, dtype=np.int64)
    number[ks * M + mb] = np.arange(N)
    # Per (kind, stage) and dependency j (at most two): ks * M of its first and second choice (-1: none), and whether
    # it is on another rank (built as lists: numpy's item assignment is slow).
    table = [(-1, -1, 0) * 2] * (len(kinds) * S)  # per ks: (first, second, remote) for j = 0, then j = 1
    code_at, link_at = [0] * (len(kinds) * S), [-1] * (len(kinds) * S)
    for kind, k in kinds.items():
        if kind in COMM_KINDS and not communicated:
            continue  # none in the schedule
        for s in range(S):
            code_at[k * S + s] = KIND_CODES[kind]
            link_at[k * S + s] = _link(P, S, kind, s, communicated)
            row = [-1, -1, 0] * 2
            for j, choices in enumerate(_dependencies(P, S, kind, s, communicated)):
                for c, (dep_kind, dep_stage) in enumerate(choices):
                    row[3 * j + c] = (kinds[dep_kind] * S + dep_stage) * M
                row[3 * j + 2] = int(choices[0][1] % P != s % P)
            table[k * S + s] = tuple(row)
    deps = np.array(table, dtype=np.int64).reshape(len(kinds) * S, 2, 3)[ks]  # (N, j, (first, second, remote))
    code, link = np.array(code_at, dtype=np.int64), np.array(link_at, dtype=np.int64)
    needs, takes, early = [], np.zeros(N, dtype=bool), N
    for j in range(2):
        first, second, far = deps[:, j, 0], deps[:, j, 1], deps[:, j, 2]
        d = number[np.maximum(first, 0) + mb]
        d = np.where((d < 0) & (second >= 0), number[np.maximum(second, 0) + mb], d)
        d = np.where(first >= 0, d, -1)
        assert not (d[first >= 0] < 0).any(), "an action waits for one the schedule lacks (checked before)"
        late = np.flatnonzero((d >= 0) & (far == 0) & (d > np.arange(N)))  # it comes after its user on their rank
        if late.size and late[0] < early:
            early, dep = int(late[0]), int(d[late[0]])
        needs.append(np.where(d >= 0, 2 * d + far, -1).tolist())
        takes |= (d >= 0) & (far == 1)
    if early < N:
        _order_error(raw, keys, early, dep, given)
    ids, start = [], 0
    for rank_keys in raw.actions:
        ids.append(range(start, start + len(rank_keys)))
        start += len(rank_keys)
    codes, links = code[ks], link[ks]  # per action now
    return CompiledSchedule(raw=raw, ids=tuple(ids), code=tuple(codes.tolist()), stage=stage_of,
                            needs=(needs[0], needs[1]), link=tuple(links.tolist()), cost_index=codes * S + ks % S,
                            crossing=(takes, links >= 0), computes=(codes < 4).tolist(), folded=folded, given=given)


def _order_error(raw: RawSchedule, keys: list[Key], n: int, d: int, given: Schedule | None) -> None:
    """Raise: action number ``n`` comes before action number ``d`` on its rank, which it needs."""
    rank = keys[n][1] % raw.ranks
    first = sum(len(before) for before in raw.actions[:rank])  # the rank's first action number
    schedule = given or raw.to_schedule()
    action, dep = schedule.actions[rank][n - first], schedule.actions[rank][d - first]
    raise ScheduleError(_order_reason(action, dep, d - first), rank=rank, step=n - first, action=action,
                        schedule=schedule)


# -- which actions exist -----------------------------------------------------------------------------------------------


def _check_actions(schedule: Schedule, keys: list[Key]) -> dict[Key, _Position]:
    """Range, placement, duplicate and completeness checks; returns where each action (by key) sits."""
    index: dict[Key, _Position] = {}
    S, M, P = schedule.stages, schedule.microbatches, schedule.ranks
    positions = ((rank, step) for rank in range(P) for step in range(len(schedule.actions[rank])))
    for number, (key, (rank, step)) in enumerate(zip(keys, positions)):
        stage, mb = key[1], key[2]
        if stage < S and mb < M and stage % P == rank and key not in index:
            index[key] = (rank, step, number)
            continue
        if stage >= S:
            reason = f"stage {stage} does not exist (stages={S})"
        elif mb >= M:
            reason = f"microbatch {mb} does not exist (microbatches={M})"
        elif stage % P != rank:
            reason = f"stage {stage} lives on rank {stage % P} (stage s is on rank s % {P})"
        else:
            reason = f"duplicate action: {Action(*key)} already runs at rank {index[key][0]}, step {index[key][1]}"  # type: ignore[arg-type]
        raise ScheduleError(reason, rank=rank, step=step, action=schedule.actions[rank][step], schedule=schedule)

    for stage in range(schedule.stages):
        rank = schedule.rank_of(stage)
        for mb in range(schedule.microbatches):
            f, b, i, w = (("F", stage, mb), ("B", stage, mb), ("I", stage, mb), ("W", stage, mb))
            if f in index and (b in index) != (i in index) and (i in index) == (w in index):
                continue  # the common case: F and exactly one of B or I + W
            F, B, I, W = (Action(*key) for key in (f, b, i, w))  # type: ignore[arg-type]  # noqa: E741 (the schedule's names)
            if f not in index:
                raise ScheduleError(
                    "missing action: every stage runs F once per microbatch", rank=rank, action=F, schedule=schedule
                )
            if b in index and (i in index or w in index):
                other = i if i in index else w
                raise ScheduleError(
                    f"both a full backward {B} and a split one ({Action(*other)}): run either B or I + W",  # type: ignore[arg-type]
                    rank=rank,
                    step=index[other][1],
                    action=Action(*other),  # type: ignore[arg-type]
                    schedule=schedule,
                )
            if b not in index and i not in index:
                reason = f"missing backward: expected {B}, or {I} and {W}" if w not in index else f"{W} without {I}"
                step = index[w][1] if w in index else None
                raise ScheduleError(reason, rank=rank, step=step, action=W if w in index else B, schedule=schedule)
            raise ScheduleError(
                f"missing action: the weight gradient of {I} (step {index[i][1]}) never runs",
                rank=rank,
                action=W,
                schedule=schedule,
            )
    return index


def _needed_transfers(schedule: Schedule) -> set[Key]:
    """The SEND/RECV actions a communicated schedule must hold: one pair per cross-rank edge and direction."""

    def remote(stage: int, other: int) -> bool:
        return 0 <= other < schedule.stages and schedule.rank_of(other) != schedule.rank_of(stage)

    needed: set[Key] = set()
    for stage in range(schedule.stages):
        if remote(stage, stage + 1):  # activation goes down, its gradient comes back
            for mb in range(schedule.microbatches):
                needed.update((("SEND_F", stage, mb), ("RECV_F", stage + 1, mb), ("SEND_B", stage + 1, mb),
                               ("RECV_B", stage, mb)))
    return needed


def _check_transfers(schedule: Schedule, keys: list[Key], index: dict[Key, _Position]) -> None:
    S, P = schedule.stages, schedule.ranks
    crossing = [s + 1 < S and (s + 1) % P != s % P for s in range(S)]  # does boundary s -> s + 1 cross ranks?
    # Messages between two ranks are matched in the order they were sent (as a runtime without tags would match them):
    # the k-th RECV on rank b from rank a must be for the k-th SEND on rank a to rank b.
    sends: dict[tuple[int, int], list[Key]] = {}
    receives: dict[tuple[int, int], list[Key]] = {}
    count = 0
    for key in keys:  # in (rank, step) order
        kind, stage, _ = key
        if kind not in COMM_KINDS:
            continue
        boundary = stage if kind in ("SEND_F", "RECV_B") else stage - 1
        if boundary < 0 or not crossing[boundary]:
            rank, step, _ = index[key]
            raise ScheduleError(
                "unexpected transfer: the neighbouring stage does not exist or is on the same rank (values between "
                "stages on one rank are passed locally)",
                rank=rank,
                step=step,
                action=Action(*key),  # type: ignore[arg-type]
                schedule=schedule,
            )
        count += 1
        other = _peer(key)[1] % P
        if kind[0] == "S":
            sends.setdefault((stage % P, other), []).append(key)
        else:
            receives.setdefault((other, stage % P), []).append(key)
    if count != 4 * schedule.microbatches * sum(crossing):  # every one present is needed and none twice: some lack
        missing = sorted(_needed_transfers(schedule).difference(index), key=lambda k: (k[1], k[2], k[0]))
        key, peer = missing[0], _peer(missing[0])[1]
        raise ScheduleError(
            f"missing transfer: stage {key[1]} exchanges with stage {peer} on rank {schedule.rank_of(peer)}",
            rank=schedule.rank_of(key[1]),
            action=Action(*key),  # type: ignore[arg-type]
            schedule=schedule,
        )
    for channel, received in receives.items():
        sent = sends[channel]
        for k, key in enumerate(received):
            arriving, peer = sent[k], _peer(key)
            if arriving != peer:
                rank, step, _ = index[key]
                raise ScheduleError(
                    f"out-of-order transfer: this is receive #{k} from rank {channel[0]}, which gets that rank's send "
                    f"#{k}, {Action(*arriving)} (step {index[arriving][1]}), not {Action(*peer)}; messages between "  # type: ignore[arg-type]
                    "two ranks arrive in the order they were sent, so order the RECVs like the SENDs",
                    rank=rank,
                    step=step,
                    action=Action(*key),  # type: ignore[arg-type]
                    schedule=schedule,
                )


_PEERS = {"SEND_F": ("RECV_F", 1), "RECV_F": ("SEND_F", -1), "SEND_B": ("RECV_B", -1), "RECV_B": ("SEND_B", 1)}


def _peer(key: Key) -> Key:
    """The other end of a transfer: SEND_F(s) <-> RECV_F(s + 1), SEND_B(s) <-> RECV_B(s - 1)."""
    kind, step = _PEERS[key[0]]
    return kind, key[1] + step, key[2]


# -- what each action waits for ----------------------------------------------------------------------------------------


def _dependencies(P: int, S: int, kind: str, s: int, communicated: bool) -> list[tuple[tuple[str, int], ...]]:
    """What action ``kind`` of stage ``s`` waits for (on its rank or another), with ``P`` ranks and ``S`` stages:
    per dependency, the (kind, stage) choices for the same microbatch; the first one the schedule has is it."""
    if kind == "F":
        if s == 0:
            return []
        return [(("RECV_F", s),)] if communicated and (s - 1) % P != s % P else [(("F", s - 1),)]
    if kind == "B" or kind == "I":
        if s + 1 == S:
            return [(("F", s),)]
        if communicated and (s + 1) % P != s % P:
            return [(("F", s),), (("RECV_B", s),)]
        return [(("F", s),), (("B", s + 1), ("I", s + 1))]  # whichever produces the next stage's input gradient
    if kind == "W":
        return [(("I", s),)]
    if kind == "SEND_F":
        return [(("F", s),)]
    if kind == "SEND_B":
        return [(("B", s), ("I", s))]
    assert kind in ("RECV_F", "RECV_B"), kind
    peer, _ = _PEERS[kind]  # RECV_F(s) <- SEND_F(s - 1), RECV_B(s) <- SEND_B(s + 1)
    return [((peer, s - 1 if kind == "RECV_F" else s + 1),)]


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


# -- compiling ---------------------------------------------------------------------------------------------------------


def _link(P: int, S: int, kind: str, s: int, communicated: bool) -> int:
    """The link (see :attr:`CompiledSchedule.link`) by which the value of action ``kind`` of stage ``s`` leaves its
    rank; -1 for none."""
    if kind == "SEND_F" or (not communicated and kind == "F" and s + 1 < S and (s + 1) % P != s % P):
        return 2 * s
    if kind == "SEND_B" or (not communicated and kind in ("B", "I") and s > 0 and (s - 1) % P != s % P):
        return 2 * (s - 1) + 1
    return -1
