"""Ranks as Ray actors (``--launcher ray``): the same contract as :func:`~stagewise.launch.spawn`, on a Ray cluster.

One placement group per job (one bundle of one CPU per rank, packed so that pipeline neighbours share a node where they
fit), one actor per rank in its bundle. Rank 0's actor names its node's address and a free port there; every actor
then runs ``fn(rank, world_size, port, *args)`` with :func:`rendezvous_host` returning that address, so Stagewise's
own process-group set-up runs unchanged inside the actors.

The cluster: ``RAY_ADDRESS`` (or ``address``) names an existing one; without it a local Ray instance is started for
the run (on the loopback address, with as many CPUs as ranks when the machine has fewer, as local processes share
cores) and shut down after it. Ray must be installed (``pip install 'stagewise[ray]'``).

Failures are Ray's exceptions turned into :class:`~stagewise.comm.SpawnError` as a local run reports them: a rank
whose function raised (its traceback), an actor Ray lost (its process died or its node went away: "rank r lost: ...").
Every other actor is then killed, so training's restarts (``--max-restarts``) work unchanged. SIGINT/SIGTERM ask the
actors to stop at their next step boundary (:func:`stop_requested`), as the local launcher does. Hung ranks are found
by their peers' timeouts (a rank's waits, ``--timeout``); the local launcher's heartbeat is not wired through Ray.

Arguments travel through Ray's object store (Ray pickles them: a Ray cluster trusts its own nodes).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import ConfigError
from ..comm import SpawnError, find_free_port, remove_shm_segments
from . import _spawn

__all__ = ["ray_spawn"]

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SETTLE_S = 3.0
"""After a first failure, how long the other ranks' failures are awaited to tell the cause (a lost actor) first."""

_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "PYTHONPATH")
"""Variables of this process the actors get too (a local Ray's workers would not see later changes)."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--launcher ray needs Ray: pip install 'stagewise[ray]' (or use --launcher local)") from exc
    return ray


class _Rank:
    """One rank (a Ray actor with two threads: ``run`` works while ``stop`` can still be called)."""

    def node(self) -> tuple[str, int, int]:
        """This actor's node address, a free port there, and its pid."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, find_free_port(host), os.getpid()

    def run(self, fn: Callable[..., Any], rank: int, world_size: int, host: str, port: int,
            args: tuple[Any, ...]) -> None:
        _spawn.set_rendezvous_host(host)
        fn(rank, world_size, port, *args)

    def stop(self) -> None:
        _spawn.request_stop()


def ray_spawn(fn: Callable[..., Any], world_size: int, *, args: tuple[Any, ...] = (), timeout: float = 60.0,
              address: str | None = None, stop_grace: float = 30.0) -> int | None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` Ray actors and wait for all of them; returns and
    raises as :func:`~stagewise.launch.spawn` does (None, or the signal that stopped the run)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    address = address or os.environ.get("RAY_ADDRESS")
    owned = not ray.is_initialized()
    if owned:
        env = {"env_vars": {k: os.environ[k] for k in _ENV if k in os.environ}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True, configure_logging=False)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, world_size), include_dashboard=False, runtime_env=env,
                     _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)
    deadline = time.monotonic() + timeout
    group = placement_group([{"CPU": 1}] * world_size, strategy="PACK")
    actors: list[Any] = []
    stop = _Stop()
    port = 0
    try:
        ready, _ = ray.wait([group.ready()], timeout=min(timeout, 120.0))
        if not ready:
            raise SpawnError(f"ray: the cluster could not place {world_size} ranks of 1 CPU each within "
                             f"{min(timeout, 120.0):.0f} s (ray status shows its resources); add nodes or CPUs, or "
                             "run fewer ranks", failures={}, timed_out=True)
        remote = ray.remote(num_cpus=1, max_concurrency=2, max_restarts=0)(_Rank)
        actors = [remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=rank), name=None).remote()
            for rank in range(world_size)]
        host, port, _ = ray.get(actors[0].node.remote(), timeout=max(1.0, deadline - time.monotonic()))
        refs = {actors[rank].run.remote(fn, rank, world_size, host, port, tuple(args)): rank
                for rank in range(world_size)}
        stop.install()
        failures = _wait(ray, refs, deadline, stop, actors, stop_grace)
    finally:
        stop.uninstall()
        for actor in actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(group)
        if owned:
            ray.shutdown()
        if port:
            remove_shm_segments(port)
    if failures:
        raise failures
    return stop.signum


def _wait(ray: Any, refs: dict[Any, int], deadline: float, stop: _Stop, actors: list[Any],
          grace: float) -> SpawnError | None:
    """Wait for every rank; the first failure (or the deadline, or a second signal) ends the wait."""
    pending = dict(refs)
    stop_until = None
    while pending:
        if stop.signum is not None and stop_until is None:  # ask every rank to stop at its next step boundary
            for actor in actors:
                actor.stop.remote()
            stop_until = time.monotonic() + grace
        end = deadline if stop_until is None else min(deadline, stop_until)
        if stop.forced or time.monotonic() >= end:
            left = sorted(pending.values())
            why = ("a second signal came" if stop.forced else f"they did not stop within {grace:.1f} s"
                   if stop_until is not None else None)
            message = (f"ray: stopped by {signal.Signals(stop.signum).name}; ranks {left} were killed because {why}"
                       if why else f"ray: deadline passed with ranks {left} still running; all killed")
            return SpawnError(message, failures={}, timed_out=True, signum=stop.signum)
        done, _ = ray.wait(list(pending), num_returns=1, timeout=min(0.5, max(0.0, end - time.monotonic())))
        failures = _failures(ray, pending, done)
        if failures:  # the others' failures follow within moments (a peer vanished): gather them to find the cause
            more, _ = ray.wait(list(pending), num_returns=len(pending), timeout=_SETTLE_S)
            failures |= _failures(ray, pending, more)
            lost = [r for r, text in failures.items() if " lost: " in text.splitlines()[0]]
            failures = {r: failures[r] for r in [*sorted(lost), *sorted(set(failures) - set(lost))]}
            first = next(iter(failures))
            headline = failures[first].strip().splitlines()[-1 if failures[first].startswith("Traceback") else 0]
            parts = [f"ray: rank {first} failed: {headline}; the other ranks were stopped",
                     *(f"--- rank {r} ---\n{text}" for r, text in failures.items())]
            return SpawnError("\n".join(parts), failures=failures, timed_out=False)
    return None


def _failures(ray: Any, pending: dict[Any, int], done: list[Any]) -> dict[int, str]:
    """Take ``done`` out of ``pending``; the failure text of each rank among them that failed."""
    out = {}
    for ref in done:
        rank = pending.pop(ref)
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - every failure is reported by rank
            out[rank] = _failure_text(ray, rank, exc)
    return out


def _failure_text(ray: Any, rank: int, exc: BaseException) -> str:
    """A rank's failure as the local launcher words it: the traceback of what it raised, or how Ray lost it."""
    if isinstance(exc, ray.exceptions.RayTaskError):  # Ray's text: a "ray::_Rank.run() (pid=...)" line, the frames
        lines = _ANSI.sub("", str(getattr(exc, "traceback_str", exc))).strip().splitlines()
        frames = [ln for ln in lines if not ln.startswith("ray::") and ln.strip().strip("^")]
        return "Traceback (most recent call last):\n" + "\n".join(
            ln for ln in frames if not ln.startswith("Traceback"))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"rank {rank} lost: its Ray actor died ({type(exc).__name__}: {first})"


class _Stop:
    """SIGINT/SIGTERM while the ranks run: the first asks them to stop, a second kills them (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forced = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            self.forced = True
