"""Search every layout of a cluster for the best plans.

For every factorisation ``devices = D x P`` (``P`` at most the number of units), every microbatch count ``M`` dividing
the per-replica batch, and every schedule (gpipe, 1f1b, zb; interleaved with ``V = 2`` when ``M % P == 0``): cut the
chain exactly by the units' times at that layout's microbatch size (slowest stage minimal, every stage under the
memory cap; :func:`capped_min_max_cuts`), price the layout with the cost model, and rank. With ``V = 2`` a rank holds
two stages, so each stage is cut to fit half the device memory (safe, possibly stricter than needed). Train mode
simulates layouts in order of a cheap lower bound on their step time and stops once the bound exceeds the
``limit``-th best simulated step, so only a handful of schedules are ever simulated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

from ..schedule import SCHEDULE_NAMES, ScheduleName, Sharing, build_compiled, peak_activations, simulate
from ..split import UnitInfo
from ._cluster import Cluster
from ._cost import STATE_FACTORS, allreduce_time, optimizer_time, pipeline_lower_bound
from ._cut import Chain, nested_live
from ._explain import explain_no_fit
from ._plan import MODES, RANK_ORDERS, Plan, PlanError, RankOrder, rank_of
from ._profile import ChainProfile

__all__ = ["OPTIMIZER_SECONDS_PER_BYTE", "TRAIN_SCHEDULES", "predict", "search"]

log = logging.getLogger(__name__)

TRAIN_SCHEDULES: tuple[ScheduleName, ...] = ("gpipe", "1f1b", "zb", "interleaved")
"""Schedules tried in train mode, in tie-break order (every one of :data:`stagewise.schedule.SCHEDULE_NAMES`)."""
assert sorted(TRAIN_SCHEDULES) == sorted(SCHEDULE_NAMES), "the search must try every schedule the runtime has"

OPTIMIZER_SECONDS_PER_BYTE = {"cpu": 1e-9, "cuda": 1e-11}
"""Default optimizer-step cost per parameter byte (roughly: Adam streams ~16 bytes per parameter byte)."""


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0] * (len(values) + 1)
    for i, v in enumerate(values):
        out[i + 1] = out[i] + v
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass
class _Candidate:
    P: int
    D: int
    V: int
    M: int
    rows: int
    schedule: ScheduleName
    starts: list[int]
    fwd: list[float]
    bwd: list[float]
    weight: list[float] | None
    send: list[tuple[float, float]]
    memory: list[int]
    params: list[int]
    """Per rank: parameter bytes of its stages (the weights part of ``memory``)."""
    start: list[float]
    tail: list[float]
    """Per rank: fixed seconds after its last action (gradient and loss all-reduces)."""
    opt: list[float]
    """Per rank: compute seconds of the optimizer step after that."""
    order: RankOrder = "pipelines"
    """Which (replica, position) each global rank runs: it decides which links the transfers and all-reduces use."""
    bound: float = 0.0
    throughput: float = 0.0
    latency: float = 0.0


class _Search:
    """One search: the chain's profiles and the caches shared by all layouts."""

    def __init__(self, profile: ChainProfile, cluster: Cluster, *, mode: str, global_batch: int, optimizer: str,
                 seconds_per_byte: float | None) -> None:
        self.profile = profile
        self.units = list(profile.units)
        self.cluster = cluster
        self.mode = mode
        self.G = global_batch
        self.prof = profile.profile_batch
        self.n = len(self.units)
        self.N = cluster.num_devices
        self.cap = cluster.device_memory
        # Memory is compared in ints scaled by profile_batch: act bytes scale by rows / profile_batch.
        self.state_factor = STATE_FACTORS[optimizer] if mode == "train" else 0
        factor = 2 + self.state_factor if mode == "train" else 1  # params (+ grads + optimizer state)
        self.weight = [factor * u.param_bytes * self.prof for u in self.units]
        # Per microbatch a stage holds what its units save for backward (measured), else the values crossing each cut.
        self.inbound = not profile.saved_bytes
        self.act = list(profile.saved_bytes) if profile.saved_bytes else [u.out_bytes for u in self.units]
        self.time_ms = self._times(self.prof)
        self.param_prefix = _prefix([u.param_bytes for u in self.units])
        if seconds_per_byte is None and profile.optimizer == optimizer and profile.optimizer_ms:
            opt_s = [t / 1e3 for t in profile.optimizer_ms]
        else:
            spb = OPTIMIZER_SECONDS_PER_BYTE[cluster.device_kind] if seconds_per_byte is None else seconds_per_byte
            opt_s = [optimizer_time(u.param_bytes, seconds_per_byte=spb) for u in self.units]
        self.opt_prefix = _prefix(opt_s)
        bw, lat = cluster.allreduce_link(list(range(self.N)))
        self.loss_sync = allreduce_time(8, replicas=self.N, bandwidth=bw, latency=lat)
        """Seconds of the step's loss all-reduce over every device (the same for every layout)."""
        self._at_rows: dict[int, tuple[Chain, list[float], list[float]]] = {}
        self._cuts: dict[tuple[int, int, int, tuple[int, ...]], list[int] | None] = {}
        self._links: dict[tuple[str, int, int, int], tuple[tuple[float, float], ...]] = {}
        self._reduce_links: dict[tuple[str, int, int], tuple[float, float]] = {}
        self.rejected = 0

    # -- pieces ----------------------------------------------------------------------------------------------------
    def _times(self, rows: int) -> list[float]:
        fwd, bwd = self.profile.unit_ms(rows)
        return [f + b for f, b in zip(fwd, bwd)] if self.mode == "train" else fwd

    def at_rows(self, rows: int) -> tuple[Chain, list[float], list[float]]:
        """The chain cut by the unit times at ``rows`` rows, and prefix sums of forward/backward seconds."""
        if rows not in self._at_rows:
            fwd, bwd = self.profile.unit_ms(rows)
            chain = Chain(self._times(rows), self.weight, self.act, inbound=self.inbound)
            self._at_rows[rows] = (chain, _prefix([f / 1e3 for f in fwd]), _prefix([b / 1e3 for b in bwd]))
        return self._at_rows[rows]

    def live(self, schedule: ScheduleName, P: int, V: int, M: int) -> list[int]:
        if self.mode == "serve":
            return [1] * (P * V)
        return list(peak_activations(schedule, ranks=P, microbatches=M, stages_per_rank=V).values())

    def cut(self, S: int, V: int, rows: int, live: list[int]) -> list[int] | None:
        key = (S, V, rows, tuple(live))
        if key not in self._cuts:
            self._cuts[key] = self.at_rows(rows)[0].cut(S, live, self.cap * self.prof // V, act_scale=rows)
        return self._cuts[key]

    def device(self, order: str, P: int, D: int, d: int, r: int) -> int:
        """The device (global rank) of replica ``d``'s pipeline position ``r``."""
        return rank_of(order, replica=d, position=r, stages=P, replicas=D)

    def transfer(self, P: int, D: int, a: int, b: int, nbytes: float,
                 order: str = "pipelines") -> tuple[float, float]:
        """(latency, occupancy) of ``nbytes`` from pipeline position a to b: the slowest over all replicas."""
        key = (order, P, a, b)
        links = self._links.get(key)
        if links is None:
            links = self._links[key] = tuple({self.cluster.link(self.device(order, P, D, d, a),
                                                                self.device(order, P, D, d, b)) for d in range(D)})
        if len(links) == 1:  # the common case: every replica's pair of positions is linked alike
            bw, lat = links[0]
            return lat, nbytes / bw
        return max(((lat, nbytes / bw) for bw, lat in links), key=sum)

    def reduce_link(self, P: int, D: int, r: int, order: str = "pipelines") -> tuple[float, float]:
        if (order, P, r) not in self._reduce_links:
            devices = [self.device(order, P, D, d, r) for d in range(D)]
            self._reduce_links[order, P, r] = self.cluster.allreduce_link(devices)
        return self._reduce_links[order, P, r]

    def candidate(self, schedule: ScheduleName, P: int, D: int, V: int, M: int, starts: list[int] | None = None,
                  order: RankOrder = "pipelines") -> _Candidate | None:
        rows = self.G // (D * M)
        S = P * V
        live = self.live(schedule, P, V, M)
        if starts is None:
            starts = self.cut(S, V, rows, live)
            if starts is None:
                self.rejected += 1
                return None
        cl = self.cluster
        chain, fp, bp = self.at_rows(rows)
        bounds = [*starts, self.n]
        act_o = cl.action_overhead
        fwd = [fp[bounds[j + 1]] - fp[bounds[j]] + act_o for j in range(S)]
        weight = None
        if self.mode == "train":
            compute = [bp[bounds[j + 1]] - bp[bounds[j]] for j in range(S)]
            if schedule == "zb":
                # The runtime's split backward: I computes the stage's input gradient (half of each unit's backward;
                # nothing on stage 0, whose inputs need none); W then runs autograd again from the stage's outputs
                # to its weights, which recomputes every activation gradient but the first unit's input gradient.
                # I and W are two actions.
                first = [bp[bounds[j] + 1] - bp[bounds[j]] for j in range(S)]
                inputs = [0.0 if j == 0 else compute[j] / 2 for j in range(S)]
                weight = [(compute[j] - (first[j] / 2 if j else 0.0)) + act_o for j in range(S)]
                bwd = [inputs[j] + weight[j] + act_o for j in range(S)]
            else:
                bwd = [b + act_o for b in compute]
        else:
            bwd = [0.0] * S
        send = []
        for j in range(S - 1):
            if j % P == (j + 1) % P:
                send.append((0.0, 0.0))
            else:
                nbytes = self.units[bounds[j + 1] - 1].out_bytes * rows / self.prof
                send.append(self.transfer(P, D, j % P, (j + 1) % P, nbytes, order))
        memory = [0] * P
        params = [0] * P
        opt = [0.0] * P
        pp, op = self.param_prefix, self.opt_prefix
        ks = nested_live(live)
        for j in range(S):
            memory[j % P] += chain.memory(ks[j] * rows, bounds[j], bounds[j + 1])
            params[j % P] += int(pp[bounds[j + 1]] - pp[bounds[j]])
            opt[j % P] += op[bounds[j + 1]] - op[bounds[j]]
        memory = [-(-m // self.prof) for m in memory]
        start = [0.0] * P
        tail = [0.0] * P
        if self.mode != "train":
            opt = [0.0] * P
        else:
            load = self.profile.load_seconds(self.G // D)  # the ranks with inputs or targets read the batch
            start[0] = start[P - 1] = load
            for r in range(P):
                bw_, lat = self.reduce_link(P, D, r, order)
                tail[r] = allreduce_time(params[r], replicas=D, bandwidth=bw_, latency=lat) + self.loss_sync
        c = _Candidate(P=P, D=D, V=V, M=M, rows=rows, schedule=schedule, starts=starts, fwd=fwd, bwd=bwd,
                       weight=weight, send=send, memory=memory, params=params, start=start, tail=tail, opt=opt,
                       order=order)
        so, ro = cl.send_overhead, cl.recv_overhead
        if self.mode == "train":
            busy = [0.0] * P
            crossing = [0, *(int(j % P != (j + 1) % P) for j in range(S - 1)), 0]  # boundary j - 1 -> j crosses ranks
            for j in range(S):
                remote = crossing[j] + crossing[j + 1]
                busy[j % P] += M * (fwd[j] + bwd[j] + remote * (so + ro))
            c.bound = pipeline_lower_bound(schedule, ranks=P, busy=busy, forward=fwd, backward=bwd, start=start,
                                           tail=[a + b for a, b in zip(tail, opt)],
                                           fwd_delay=[so + lat + occ for lat, occ in send],
                                           bwd_delay=[lat + occ + ro for lat, occ in send])
        else:
            hop = [lat + occ + so + ro if j % P != (j + 1) % P else 0.0 for j, (lat, occ) in enumerate(send)]
            slowest = max(fwd[j] + (hop[j] if j < S - 1 else 0.0) for j in range(S))
            c.throughput = D * rows / slowest if slowest > 0 else math.inf
            c.latency = sum(fwd) + sum(hop)
        return c

    def layouts(self, schedules: Sequence[ScheduleName]) -> list[_Candidate]:
        out = []
        for P in _divisors(self.N):
            D = self.N // P
            if P > self.n or self.G % D:
                continue
            for M in _divisors(self.G // D):
                for schedule, V in self.options(P, M, schedules):
                    if P * V > self.n:
                        continue
                    for order in self.orders(P, D):
                        c = self.candidate(schedule, P, D, V, M, order=order)
                        if c is not None:
                            out.append(c)
        return out

    def orders(self, P: int, D: int) -> tuple[RankOrder, ...]:
        """The rank orders worth pricing: both when replicas and pipelines may span nodes, else the default."""
        return RANK_ORDERS if P > 1 and D > 1 and len(self.cluster.nodes) > 1 else ("pipelines",)

    def options(self, P: int, M: int, schedules: Sequence[ScheduleName]) -> list[tuple[ScheduleName, int]]:
        if self.mode == "serve":
            return [("gpipe", 1)]
        if P == 1:  # one rank: every schedule is the same loop; 1F1B keeps the fewest activations
            return [("1f1b", 1)]
        # With one microbatch 1F1B runs GPipe's very action lists (F, then B): list that layout once.
        same = M == 1 and "gpipe" in schedules
        opts = [(s, 1) for s in schedules if s != "interleaved" and not (same and s == "1f1b")]
        if "interleaved" in schedules and M % P == 0:
            opts.append(("interleaved", 2))
        return opts

    # -- finishing ---------------------------------------------------------------------------------------------------
    def simulate(self, c: _Candidate) -> tuple[float, float]:
        """(step time, bubble) of ``c``: the schedule engine on the compiled schedule the runtime would run."""
        cl = self.cluster
        sharing = None
        if self.mode == "train" and cl.contention > 1.0:
            pool, share = self.sharing(c.P, c.D, c.order)
            sharing = Sharing(contention=cl.contention, pool=pool, share=share)
        # Serving sends no gradients back (its B actions cost nothing; their SEND/RECV still cost the ranks).
        back = c.send if self.mode == "train" else [(0.0, 0.0)] * len(c.send)
        compiled = build_compiled(c.schedule, ranks=c.P, microbatches=c.M, stages_per_rank=c.V, folded=True)
        timeline = simulate(compiled, forward_cost=c.fwd, backward_cost=c.bwd, weight_cost=c.weight,
                            forward_links=c.send, backward_links=back, send_overhead=cl.send_overhead,
                            recv_overhead=cl.recv_overhead, start=c.start, tail=c.tail, tail_work=c.opt,
                            sharing=sharing)
        return timeline.step_time, timeline.bubble_fraction

    def sharing(self, P: int, D: int, order: str = "pipelines") -> tuple[list[int], list[list[int]]]:
        """Devices on each pipeline rank's node (replica 0's), and how many copies of every rank (over all replicas)
        share it."""
        nodes = self.cluster.node_of()
        at = [nodes[self.device(order, P, D, 0, r)] for r in range(P)]
        pool = [self.cluster.nodes[at[r]].devices for r in range(P)]
        share = [[sum(1 for d in range(D) if nodes[self.device(order, P, D, d, q)] == at[r]) for q in range(P)]
                 for r in range(P)]
        return pool, share

    def plan(self, c: _Candidate, step: float, bubble: float) -> Plan:
        names = [u.name for u in self.units]
        S = c.P * c.V
        if self.mode == "train":
            throughput = self.G / step if step > 0 else 0.0
            comm = self.cluster.send_overhead + self.cluster.recv_overhead
            latency = sum(c.fwd) + sum(lat + occ + comm for j, (lat, occ) in enumerate(c.send)
                                       if j % c.P != (j + 1) % c.P)
        else:
            throughput, latency = c.throughput, c.latency
        grads = c.params if self.mode == "train" else [0] * c.P
        state = [self.state_factor * b for b in c.params]
        acts = [m - w - g - o for m, w, g, o in zip(c.memory, c.params, grads, state)]
        return Plan(mode=self.mode, devices=c.P * c.D, stages=c.P, replicas=c.D, stages_per_rank=c.V,
                    microbatches=c.M, schedule=c.schedule, global_batch=self.G, microbatch_rows=c.rows,
                    cut=[names[s] for s in c.starts], step_time_s=step, bubble_fraction=max(0.0, bubble),
                    memory_bytes=c.memory, device_memory_bytes=self.cap,
                    stage_time_s=[c.fwd[j] + c.bwd[j] for j in range(S)],
                    throughput=throughput if math.isfinite(throughput) else 0.0, latency_s=latency,
                    allreduce_s=max(a + b for a, b in zip(c.tail, c.opt)), weight_bytes=list(c.params),
                    gradient_bytes=grads, optimizer_bytes=state, activation_bytes=acts, rank_order=c.order)


def _tie_key(c: _Candidate) -> tuple[int, int, int, int, int, int]:
    """Among equally fast layouts: fewer (larger) microbatches, then less memory, fewer stages, simpler schedule,
    the default rank order."""
    return (c.M, max(c.memory), c.P, c.V, TRAIN_SCHEDULES.index(c.schedule), RANK_ORDERS.index(c.order))


def _q(x: float) -> float:
    """``x`` to 9 significant digits, so that float noise does not decide between equally good layouts."""
    return float(f"{x:.9g}")


def _profile_of(units: Sequence[UnitInfo] | ChainProfile, profile_batch: int | None) -> ChainProfile:
    if isinstance(units, ChainProfile):
        if profile_batch is not None and profile_batch != units.profile_batch:
            raise ValueError(f"profile_batch={profile_batch} disagrees with the profile's largest row count "
                             f"({units.profile_batch}); leave profile_batch out when passing a ChainProfile")
        return units
    if not units:
        raise ValueError("no units to plan: profile the model first (split(..., by='time', profile=True))")
    if not isinstance(profile_batch, int) or isinstance(profile_batch, bool) or profile_batch < 1:
        raise ValueError(f"profile_batch must be an int >= 1 (the rows the units were timed at), got "
                         f"{profile_batch!r}")
    return ChainProfile.from_units(units, profile_batch=profile_batch)


def _check(mode: str, global_batch: int, optimizer: str, schedules: Sequence[str]) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise ValueError(f"global_batch must be an int >= 1, got {global_batch!r}")
    bad = [s for s in schedules if s not in TRAIN_SCHEDULES]
    if bad or not schedules:
        raise ValueError(f"schedules must be a non-empty subset of {TRAIN_SCHEDULES}, got {list(schedules)!r}")
    if optimizer not in STATE_FACTORS:
        raise ValueError(f"optimizer must be one of {tuple(STATE_FACTORS)}, got {optimizer!r}")


def search(units: Sequence[UnitInfo] | ChainProfile, cluster: Cluster, *, mode: str = "train", global_batch: int,
           profile_batch: int | None = None, devices: int | None = None,
           schedules: Sequence[ScheduleName] = TRAIN_SCHEDULES, optimizer: str = "adam", limit: int | None = 10,
           seconds_per_byte: float | None = None) -> list[Plan]:
    """The best plans for running a profiled chain on ``cluster`` (its first ``devices`` devices if given), best
    first: by predicted step time in train mode, by throughput then latency in serve mode. At most ``limit`` plans
    (None: every layout that fits).

    ``units`` is a :class:`ChainProfile` (:func:`profile_chain`: times at several microbatch sizes, loss, data loading,
    optimizer step), or plain units timed at ``profile_batch`` rows (times then scale in proportion to rows, and the
    optimizer costs ``seconds_per_byte`` per parameter byte). An explicit ``seconds_per_byte`` overrides a profiled
    optimizer step.

    Raises :class:`PlanError` naming the smallest change that would fit when no layout fits in device memory.
    """
    profile = _profile_of(units, profile_batch)
    _check(mode, global_batch, optimizer, schedules)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if devices is not None:
        cluster = cluster.take(devices)
    s = _Search(profile, cluster, mode=mode, global_batch=global_batch, optimizer=optimizer,
                seconds_per_byte=seconds_per_byte)
    candidates = s.layouts(schedules)
    log.debug("plan search: %d layouts fit, %d rejected for memory", len(candidates), s.rejected)
    if not candidates:
        raise PlanError(explain_no_fit(mode=mode, devices=s.N, cap=s.cap, global_batch=s.G, units=s.units,
                                       time_ms=s.time_ms, weight=s.weight, profile_batch=s.prof, rejected=s.rejected))
    if mode == "serve":
        candidates.sort(key=lambda c: (-_q(c.throughput), _q(c.latency), *_tie_key(c)))
        return [s.plan(c, *s.simulate(c)) for c in candidates[:limit]]
    candidates.sort(key=lambda c: (c.bound, *_tie_key(c)))
    done: list[tuple[float, tuple[int, int, int, int, int, int], _Candidate, float]] = []
    simulated = 0
    for c in candidates:
        if limit is not None and len(done) >= limit and _q(c.bound) > _q(done[limit - 1][0]):
            break
        step, bubble = s.simulate(c)
        simulated += 1
        done.append((step, _tie_key(c), c, bubble))
        done.sort(key=lambda x: (_q(x[0]), x[1]))
    log.debug("plan search: simulated %d of %d layouts", simulated, len(candidates))
    return [s.plan(c, step, bubble) for step, _, c, bubble in done[:limit]]


def predict(units: Sequence[UnitInfo] | ChainProfile, cluster: Cluster, *, stages: int, replicas: int = 1,
            microbatches: int, schedule: ScheduleName, cut: Sequence[str], global_batch: int, stages_per_rank: int = 1,
            profile_batch: int | None = None, mode: str = "train", optimizer: str = "adam",
            seconds_per_byte: float | None = None, rank_order: RankOrder = "pipelines") -> Plan:
    """The cost model's :class:`Plan` for one given layout and cut (``cut``: the first unit of every stage, as in
    :attr:`Plan.cut`), e.g. to price a hand-made or a baseline split next to :func:`search`'s plans, with global rank
    ``g`` on the cluster's device ``g`` running what ``rank_order`` says. The memory is reported, not checked against
    the cap."""
    profile = _profile_of(units, profile_batch)
    _check(mode, global_batch, optimizer, [schedule] if schedule in TRAIN_SCHEDULES else [])
    P, D, V, M = stages, replicas, stages_per_rank, microbatches
    for name, value in (("stages", P), ("replicas", D), ("stages_per_rank", V), ("microbatches", M)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if P * D > cluster.num_devices:
        raise ValueError(f"stages x replicas = {P * D} needs more devices than the cluster has "
                         f"({cluster.num_devices})")
    if global_batch % (D * M):
        raise ValueError(f"global_batch {global_batch} must divide by replicas x microbatches = {D * M}")
    names = [u.name for u in profile.units]
    unknown = [c for c in cut if c not in names]
    if unknown:
        raise ValueError(f"cut names unknown units {unknown}; units are {names}")
    starts = [names.index(c) for c in cut]
    if len(starts) != P * V or starts[0] != 0 or starts != sorted(set(starts)):
        raise ValueError(f"cut must name {P * V} distinct units in chain order, the first being {names[0]!r}; "
                         f"got {list(cut)}")
    s = _Search(profile, cluster.take(P * D), mode=mode, global_batch=global_batch, optimizer=optimizer,
                seconds_per_byte=seconds_per_byte)
    if rank_order not in RANK_ORDERS:
        raise ValueError(f"rank_order must be one of {RANK_ORDERS}, got {rank_order!r}")
    c = s.candidate(schedule, P, D, V, M, starts=starts, order=rank_order)
    assert c is not None
    return s.plan(c, *s.simulate(c))
