"""The cost model: pure functions from unit profiles, a layout and a cut to predicted time and memory.

Terms (each a small function below, unit-tested on hand-computed examples):

- compute: a unit's forward/backward milliseconds at a microbatch of ``rows`` come from its profile
  (:class:`~stagewise.plan.ChainProfile`): interpolated between the row counts it was timed at (one row count:
  proportional to rows). The loss is part of the last unit. A stage's cost is the sum over its units, plus the
  runtime's ``action_overhead`` per compute action (F and B; I and W under ZB).
- transfer: the activation crossing a cut (``out_bytes`` of the stage's last unit, scaled by rows) moves in
  ``latency + bytes / bandwidth`` forward, and its gradient (same size) back. The bytes/bandwidth part occupies the
  link (transfers on one link queue), the latency part does not. The ranks pay too: the sender is busy
  ``send_overhead`` posting it, the receiver ``recv_overhead`` taking it in (the runtime's SEND and RECV actions).
- all-reduce (train, ``D > 1``): ring all-reduce of the rank's gradient bytes, ``2 (D-1)/D * bytes / bandwidth`` plus
  ``2 (D-1)`` ring-step latencies; every step also ends with an all-reduce of the loss over all ranks.
- optimizer: the profiled optimizer step of the rank's units (timed by :func:`stagewise.launch.time_optimizer`), or
  ``param bytes * seconds_per_byte``.
- data: the ranks that read inputs or targets (those holding the first or the last stage) load their replica's
  batch before the pipeline starts.
- step time: the schedule the runtime runs (:func:`stagewise.schedule.build_compiled`, its SEND/RECV folded into the
  compute actions next to them, which prices them exactly alike) is *simulated* by the schedule engine
  (:func:`stagewise.schedule.simulate`) with those stage costs, per-boundary links and per-action send and receive
  costs; each rank's all-reduce and optimizer follow its last action, and the step ends with the loss
  all-reduce. On nodes whose devices slow each other down (CPU cores: :attr:`~stagewise.plan.Cluster.contention` > 1)
  the engine shares their compute (:class:`stagewise.schedule.Sharing`).
- memory per rank: parameters + gradients + optimizer state (train; Adam keeps 2x params) or parameters (serve), plus
  per microbatch the activations a stage holds (its input and every unit's output, scaled to ``rows``) times the most
  microbatches in flight at that stage under the schedule (:func:`stagewise.schedule.peak_activations`).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "STATE_FACTORS",
    "allreduce_time",
    "optimizer_time",
    "pipeline_lower_bound",
    "transfer_time",
]

STATE_FACTORS = {"adam": 2, "adamw": 2, "sgd": 1}
"""Optimizer state per parameter byte (Adam: two moments; SGD: one momentum buffer, counted even if unused)."""


def transfer_time(nbytes: float, *, bandwidth: float, latency: float) -> float:
    """Seconds to move ``nbytes`` over one link: ``latency + nbytes / bandwidth``."""
    return latency + nbytes / bandwidth


def allreduce_time(nbytes: float, *, replicas: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``replicas`` devices (0 for one replica)."""
    if replicas <= 1:
        return 0.0
    return 2 * (replicas - 1) / replicas * nbytes / bandwidth + 2 * (replicas - 1) * latency


def optimizer_time(param_bytes: float, *, seconds_per_byte: float) -> float:
    """Seconds of the optimizer step over ``param_bytes`` of parameters."""
    return param_bytes * seconds_per_byte


def pipeline_lower_bound(schedule: str, *, ranks: int, busy: Sequence[float], forward: Sequence[float],
                         backward: Sequence[float], fwd_delay: Sequence[float], bwd_delay: Sequence[float],
                         start: Sequence[float] | None = None, tail: Sequence[float] | None = None) -> float:
    """A cheap lower bound on the simulated step time (:func:`stagewise.schedule.simulate`): rank ``r`` cannot start
    before ``start[r]`` nor
    before microbatch 0's forward reached it, works ``busy[r]`` (everything it does in the pipeline, transfer costs
    on the rank included), then ``tail[r]``; and (except ZB, whose last actions are deferred W) its last backward
    still has to travel back through stages ``r - 1 .. 0`` before rank 0's tail. ``fwd_delay[j]``: the least time
    from the end of stage ``j``'s forward to its value arriving at ``j + 1``; ``bwd_delay[j]``: from the end of stage
    ``j + 1``'s backward until stage ``j`` can compute on the gradient."""
    begin = [0.0] * ranks if start is None else list(start)
    after = [0.0] * ranks if tail is None else list(tail)
    best = 0.0
    head = begin[0]
    back = 0.0
    for r in range(ranks):
        if r > 0:
            head += forward[r - 1] + fwd_delay[r - 1]
            back += backward[r - 1] + bwd_delay[r - 1]
        work = max(head, begin[r]) + busy[r]
        best = max(best, work + after[r])
        if schedule != "zb" and r > 0:
            best = max(best, work + back + after[0])
    return best
