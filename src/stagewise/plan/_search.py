"""Search every layout of a cluster for the best plans.

For every factorisation ``devices = D x P`` (``P`` at most the number of units), every microbatch count ``M`` dividing
the per-replica batch, and every schedule (gpipe, 1f1b, zb; interleaved with ``V = 2`` when ``M % P == 0``): cut the
chain exactly (slowest stage minimal, every stage under the memory cap; :func:`capped_min_max_cuts`), price the layout
with the cost model, and rank. With ``V = 2`` a rank holds two stages, so each stage is cut to fit half the device
memory (safe, possibly stricter than needed). Train mode simulates layouts in order of a cheap lower bound on their
step time and stops once the bound exceeds the ``limit``-th best simulated step, so only a handful of schedules are
ever simulated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

from ..split import UnitInfo
from ._cluster import Cluster
from ._cost import (
    STATE_FACTORS,
    activation_peaks,
    allreduce_time,
    optimizer_time,
    pipeline_lower_bound,
    simulate_costs,
)
from ._cut import Chain, nested_live
from ._plan import MODES, Plan, PlanError

__all__ = ["search", "TRAIN_SCHEDULES", "OPTIMIZER_SECONDS_PER_BYTE"]

log = logging.getLogger(__name__)

TRAIN_SCHEDULES = ("gpipe", "1f1b", "zb", "interleaved")
"""Schedules tried in train mode, in tie-break order."""

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
    schedule: str
    starts: list[int]
    fwd: list[float]
    bwd: list[float]
    send: list[tuple[float, float]]
    memory: list[int]
    post: float
    bound: float = 0.0
    throughput: float = 0.0
    latency: float = 0.0


class _Search:
    """One search: the chain's integer profiles and the caches shared by all layouts."""

    def __init__(self, units: Sequence[UnitInfo], cluster: Cluster, *, mode: str, global_batch: int,
                 profile_batch: int, optimizer: str, seconds_per_byte: float) -> None:
        self.units = list(units)
        self.cluster = cluster
        self.mode = mode
        self.G = global_batch
        self.prof = profile_batch
        self.spb = seconds_per_byte
        self.n = len(self.units)
        self.N = cluster.num_devices
        self.cap = cluster.device_memory
        # Memory is compared in ints scaled by profile_batch: act bytes scale by rows / profile_batch.
        factor = 2 + STATE_FACTORS[optimizer] if mode == "train" else 1  # params (+ grads + optimizer state)
        self.weight = [factor * u.param_bytes * profile_batch for u in self.units]
        self.time_ms = [u.forward_ms + u.backward_ms if mode == "train" else u.forward_ms for u in self.units]
        self.chain = Chain(self.time_ms, self.weight, [u.out_bytes for u in self.units])
        self.fwd_prefix = _prefix([u.forward_ms for u in self.units])
        self.bwd_prefix = _prefix([u.backward_ms for u in self.units])
        self.param_prefix = _prefix([u.param_bytes for u in self.units])
        self._cuts: dict[tuple[int, int, int, tuple[int, ...]], list[int] | None] = {}
        self._links: dict[tuple[int, int, int], set[tuple[float, float]]] = {}
        self._reduce_links: dict[tuple[int, int], tuple[float, float]] = {}
        self.rejected = 0

    # -- pieces ----------------------------------------------------------------------------------------------------
    def live(self, schedule: str, P: int, V: int, M: int) -> list[int]:
        if self.mode == "serve":
            return [1] * (P * V)
        return activation_peaks(schedule, ranks=P, microbatches=M, stages_per_rank=V)

    def cut(self, S: int, V: int, rows: int, live: list[int]) -> list[int] | None:
        key = (S, V, rows, tuple(live))
        if key not in self._cuts:
            self._cuts[key] = self.chain.cut(S, live, self.cap * self.prof // V, act_scale=rows)
        return self._cuts[key]

    def transfer(self, P: int, D: int, a: int, b: int, nbytes: float) -> tuple[float, float]:
        """(latency, occupancy) of ``nbytes`` from pipeline position a to b: the slowest over all replicas."""
        key = (P, a, b)
        if key not in self._links:
            self._links[key] = {self.cluster.link(d * P + a, d * P + b) for d in range(D)}
        return max(((lat, nbytes / bw) for bw, lat in self._links[key]), key=sum)

    def candidate(self, schedule: str, P: int, D: int, V: int, M: int) -> _Candidate | None:
        rows = self.G // (D * M)
        S = P * V
        live = self.live(schedule, P, V, M)
        starts = self.cut(S, V, rows, live)
        if starts is None:
            self.rejected += 1
            return None
        scale = rows / self.prof / 1e3  # profiled ms at profile_batch rows -> seconds at `rows`
        bounds = [*starts, self.n]
        fp, bp, pp = self.fwd_prefix, self.bwd_prefix, self.param_prefix
        fwd = [(fp[bounds[j + 1]] - fp[bounds[j]]) * scale for j in range(S)]
        bwd = [(bp[bounds[j + 1]] - bp[bounds[j]]) * scale for j in range(S)] if self.mode == "train" else [0.0] * S
        send = []
        for j in range(S - 1):
            if j % P == (j + 1) % P:
                send.append((0.0, 0.0))
            else:
                nbytes = self.units[bounds[j + 1] - 1].out_bytes * rows / self.prof
                send.append(self.transfer(P, D, j % P, (j + 1) % P, nbytes))
        memory = [0] * P
        params = [0] * P
        ks = nested_live(live)
        for j in range(S):
            memory[j % P] += self.chain.memory(ks[j] * rows, bounds[j], bounds[j + 1])
            params[j % P] += pp[bounds[j + 1]] - pp[bounds[j]]
        memory = [-(-m // self.prof) for m in memory]
        post = 0.0
        if self.mode == "train":
            for r in range(P):
                if (P, r) not in self._reduce_links:
                    self._reduce_links[P, r] = self.cluster.allreduce_link([d * P + r for d in range(D)])
                bw_, lat = self._reduce_links[P, r]
                post = max(post, allreduce_time(params[r], replicas=D, bandwidth=bw_, latency=lat)
                           + optimizer_time(params[r], seconds_per_byte=self.spb))
        c = _Candidate(P=P, D=D, V=V, M=M, rows=rows, schedule=schedule, starts=starts, fwd=fwd, bwd=bwd, send=send,
                       memory=memory, post=post)
        hop = [lat + occ for lat, occ in send]
        if self.mode == "train":
            busy = [0.0] * P
            for j in range(S):
                busy[j % P] += M * (fwd[j] + bwd[j])
            c.bound = post + pipeline_lower_bound(schedule, ranks=P, busy=busy, forward=fwd, backward=bwd,
                                                  fwd_delay=hop, bwd_delay=hop)
        else:
            slowest = max(fwd[j] + (hop[j] if j < S - 1 else 0.0) for j in range(S))
            c.throughput = D * rows / slowest if slowest > 0 else math.inf
            c.latency = sum(fwd) + sum(hop)
        return c

    def layouts(self, schedules: Sequence[str]) -> list[_Candidate]:
        out = []
        for P in _divisors(self.N):
            D = self.N // P
            if P > self.n or self.G % D:
                continue
            for M in _divisors(self.G // D):
                for schedule, V in self.options(P, M, schedules):
                    if P * V > self.n:
                        continue
                    c = self.candidate(schedule, P, D, V, M)
                    if c is not None:
                        out.append(c)
        return out

    def options(self, P: int, M: int, schedules: Sequence[str]) -> list[tuple[str, int]]:
        if self.mode == "serve":
            return [("gpipe", 1)]
        if P == 1:  # one rank: every schedule is the same loop; 1F1B keeps the fewest activations
            return [("1f1b", 1)]
        opts = [(s, 1) for s in schedules if s != "interleaved"]
        if "interleaved" in schedules and M % P == 0:
            opts.append(("interleaved", 2))
        return opts

    # -- finishing ---------------------------------------------------------------------------------------------------
    def simulate(self, c: _Candidate) -> tuple[float, float]:
        back = c.send if self.mode == "train" else None  # serving sends no gradients back
        step, bubble, _ = simulate_costs(c.schedule, ranks=c.P, microbatches=c.M, stages_per_rank=c.V,
                                         forward=c.fwd, backward=c.bwd, send_forward=c.send, send_backward=back)
        return step + c.post, bubble

    def plan(self, c: _Candidate, step: float, bubble: float) -> Plan:
        names = [u.name for u in self.units]
        S = c.P * c.V
        if self.mode == "train":
            throughput = self.G / step if step > 0 else 0.0
            latency = sum(c.fwd) + sum(lat + occ for lat, occ in c.send)
        else:
            throughput, latency = c.throughput, c.latency
        return Plan(mode=self.mode, devices=c.P * c.D, stages=c.P, replicas=c.D, stages_per_rank=c.V,
                    microbatches=c.M, schedule=c.schedule, global_batch=self.G, microbatch_rows=c.rows,
                    cut=[names[s] for s in c.starts], step_time_s=step, bubble_fraction=max(0.0, bubble),
                    memory_bytes=c.memory, device_memory_bytes=self.cap,
                    stage_time_s=[c.fwd[j] + c.bwd[j] for j in range(S)],
                    throughput=throughput if math.isfinite(throughput) else 0.0, latency_s=latency,
                    allreduce_s=c.post)


def _tie_key(c: _Candidate) -> tuple[int, int, int, int, int]:
    """Among equally fast layouts: fewer (larger) microbatches, then less memory, fewer stages, simpler schedule."""
    return (c.M, max(c.memory), c.P, c.V, TRAIN_SCHEDULES.index(c.schedule))


def _q(x: float) -> float:
    """``x`` to 9 significant digits, so that float noise does not decide between equally good layouts."""
    return float(f"{x:.9g}")


def search(units: Sequence[UnitInfo], cluster: Cluster, *, mode: str = "train", global_batch: int,
           profile_batch: int, devices: int | None = None, schedules: Sequence[str] = TRAIN_SCHEDULES,
           optimizer: str = "adam", limit: int | None = 10, seconds_per_byte: float | None = None) -> list[Plan]:
    """The best plans for running ``units`` (a profiled chain, times measured at ``profile_batch`` rows) on
    ``cluster`` (its first ``devices`` devices if given), best first: by predicted step time in train mode, by
    throughput then latency in serve mode. At most ``limit`` plans (None: every layout that fits).

    Raises :class:`PlanError` naming the smallest change that would fit when no layout fits in device memory.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not units:
        raise ValueError("no units to plan: profile the model first (split(..., by='time', profile=True))")
    for name, value in (("global_batch", global_batch), ("profile_batch", profile_batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    bad = [s for s in schedules if s not in TRAIN_SCHEDULES]
    if bad or not schedules:
        raise ValueError(f"schedules must be a non-empty subset of {TRAIN_SCHEDULES}, got {list(schedules)!r}")
    if optimizer not in STATE_FACTORS:
        raise ValueError(f"optimizer must be one of {tuple(STATE_FACTORS)}, got {optimizer!r}")
    if devices is not None:
        cluster = cluster.take(devices)
    spb = OPTIMIZER_SECONDS_PER_BYTE[cluster.device_kind] if seconds_per_byte is None else seconds_per_byte
    s = _Search(units, cluster, mode=mode, global_batch=global_batch, profile_batch=profile_batch,
                optimizer=optimizer, seconds_per_byte=spb)
    candidates = s.layouts(schedules)
    log.debug("plan search: %d layouts fit, %d rejected for memory", len(candidates), s.rejected)
    if not candidates:
        from ._explain import explain_no_fit

        raise PlanError(explain_no_fit(s))
    if mode == "serve":
        candidates.sort(key=lambda c: (-_q(c.throughput), _q(c.latency), *_tie_key(c)))
        return [s.plan(c, *s.simulate(c)) for c in candidates[:limit]]
    candidates.sort(key=lambda c: (c.bound, *_tie_key(c)))
    done: list[tuple[float, tuple[int, int, int, int, int], _Candidate, float]] = []
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
