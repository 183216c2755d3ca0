"""Restarting a local run after a rank dies or hangs: every rank is stopped (by :func:`~stagewise.launch.spawn`) and
the run starts again from the newest complete snapshot, the checkpoint the ranks save every ``snapshot_every`` steps.
Each restart is logged and, with ``--trace``, marked in the trace (an instant event naming the cause and the step the
run went on from).

The snapshot holds the weights, optimizer state, LR schedule, every rank's RNG and (through its step) the data
position, so on the same layout the restarted run computes exactly what the lost steps computed: the final weights
equal an uninterrupted run's, bit for bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..comm import SpawnError
from ..runtime import write_markers
from ._config import TrainConfig

__all__ = ["Restarts", "failure_cause", "resume_after_torchrun_restart", "run_with_restarts"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Restarts:
    """What the restarts of one run did: one cause per restart, and the losses of the steps the failed attempts
    finished up to their snapshot (by step number, from 1)."""

    first_step: int
    """The step the run began from (0, or the step of the checkpoint it resumed)."""
    causes: list[str] = dataclasses.field(default_factory=list)
    losses: dict[int, float] = dataclasses.field(default_factory=dict)

    def losses_before(self, step: int) -> list[float]:
        """The losses of the steps after ``first_step`` up to ``step`` that earlier attempts kept in snapshots."""
        if not self.causes:  # no restart: the last attempt ran from the start
            return []
        return [self.losses[s] for s in range(self.first_step + 1, step + 1)]


def failure_cause(exc: SpawnError) -> str:
    """The rank that caused a failed launch (spawn puts it first) and what happened, in one line: how its process
    ended ("rank 1 killed by signal SIGKILL ...", "rank 3 sent no heartbeat ...") or the exception it raised (its
    traceback's last line)."""
    rank = next(iter(exc.failures))
    lines = [line.strip() for line in exc.failures[rank].strip().splitlines() if line.strip()] or ["no report"]
    cause = (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:300]
    return cause if cause.startswith(f"rank {rank} ") else f"rank {rank} failed: {cause}"


def run_with_restarts(launch: Callable[[TrainConfig], int | None], config: TrainConfig, *,
                      snapshots: Path) -> tuple[int | None, Restarts]:
    """Call ``launch(config)`` (it runs every rank and waits) until it returns, restarting from the newest
    checkpoint under ``snapshots`` after each failure, at most ``config.recovery.max_restarts`` times.

    Returns what ``launch`` returned (the stopping signal, or None) and the restarts. A launch stopped by a signal
    (SIGINT, SIGTERM) or past its deadline is not restarted; after the last allowed restart a failure raises
    :class:`SpawnError` naming every failure.
    """
    limit = config.recovery.max_restarts
    resume = config.output.resume
    trace = Path(config.output.trace) if config.output.trace is not None else None
    markers: list[dict[str, object]] = []
    if trace is not None:
        write_markers(trace, markers)  # none yet: an earlier run's markers must not show in this run's trace
    restarts = Restarts(first_step=_step_of(Path(resume)) if limit and resume is not None else 0)
    earlier = _newest(snapshots) if limit else None  # what an earlier run left under --save: no snapshot of this one
    attempt = config
    while True:
        try:
            return launch(attempt), restarts
        except SpawnError as exc:
            if exc.signum is not None or exc.timed_out or limit == 0:
                raise
            cause = failure_cause(exc)
            restarts.causes.append(cause)
            if len(restarts.causes) > limit:
                listed = "; ".join(f"{i + 1}) {c}" for i, c in enumerate(restarts.causes))
                raise SpawnError(f"training failed {len(restarts.causes)} times, more than --max-restarts {limit} "
                                 f"allows: {listed}; fix the cause or raise --max-restarts\n{exc}",
                                 failures=exc.failures, timed_out=False) from exc
            snapshot = _newest(snapshots)
            if snapshot is not None and snapshot != earlier:
                _keep_losses(restarts, snapshot[0])
                attempt = dataclasses.replace(attempt, resume=str(snapshot[0]))
                step = _step_of(snapshot[0])
            else:  # failed before the first snapshot: from where the run began
                attempt = dataclasses.replace(attempt, resume=resume)
                step = restarts.first_step
            log.warning("restart %d of %d: %s; every rank was stopped; restarting from step %d",
                        len(restarts.causes), limit, cause, step)
            if trace is not None:
                markers.append({"name": f"restart {len(restarts.causes)}: {cause}", "time": time.time(),
                                "args": {"cause": cause, "from_step": step}})
                write_markers(trace, markers)


def resume_after_torchrun_restart(config: TrainConfig) -> TrainConfig:
    """Under torchrun's own ``--max-restarts`` (TorchElastic restarts every worker after a failure and sets
    ``TORCHELASTIC_RESTART_COUNT``): a restarted rank goes on from the newest complete checkpoint in ``--save``, as a
    local ``--max-restarts`` run goes on from its newest snapshot. Every rank reads the same folder, so all pick the
    same step (a save in progress when the job failed was never renamed into place). A first start is unchanged."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    folder = config.output.save_dir
    if not restart or folder is None:
        return config
    newest = _newest(Path(folder))
    if newest is None:
        log.warning("torchrun restart %d: no checkpoint in %s yet; starting over", restart, folder)
        return config
    log.warning("torchrun restart %d: resuming from %s (step %d)", restart, newest[0], _step_of(newest[0]))
    return dataclasses.replace(config, resume=str(newest[0]))


def _newest(root: Path) -> tuple[Path, int] | None:
    """The newest complete checkpoint under ``root`` and its manifest's mtime (a step saved again is another one)."""
    from .._checkpoint_layout import MANIFEST
    from ..checkpoint import latest_checkpoint

    found = latest_checkpoint(root) if root.is_dir() else None
    try:
        return None if found is None else (found, (found / MANIFEST).stat().st_mtime_ns)
    except FileNotFoundError:  # pruned in between
        return None


def _step_of(path: Path) -> int:
    from ..checkpoint import load_checkpoint

    return load_checkpoint(path, verify="size").step


def _keep_losses(restarts: Restarts, snapshot: Path) -> None:
    """Record the losses the snapshot's attempt computed (its manifest has them from that attempt's first step)."""
    from ..checkpoint import load_checkpoint

    extra = load_checkpoint(snapshot, verify="size").extra
    first = int(extra.get("first_step", 0))
    for i, loss in enumerate(extra.get("losses", [])):
        restarts.losses[first + i + 1] = float(loss)
