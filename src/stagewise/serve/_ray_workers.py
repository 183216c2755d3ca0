"""Serving workers as Ray actors (``stagewise serve ... --launcher ray``).

A stage worker is the same :func:`~stagewise.serve._worker.worker_main` either way; under Ray it runs as the one task
of an actor of its own, and :class:`RayWorker` gives the supervisor the part of ``multiprocessing.Process`` it uses
(``start``, ``pid``, ``exitcode``, ``kill``, ``join``, ``close``), so failover, restarts and reaping are unchanged.
A worker ends as a process does: its task returns when the gateway closes its channel (exit code 0), ``os._exit(1)``
after reporting a fatal error, or its actor dies (killed, its node lost; reported as killed by SIGKILL); Ray never
restarts an actor by itself (the supervisor restarts the whole replica).

Workers connect back to the gateway's channel, which authenticates every worker with an HMAC challenge. The cluster:
``RAY_ADDRESS`` names one; without it a local Ray is started on the loopback for the service and stopped with it.
The gateway listens on ``PipelineConfig.host``: on a cluster of several nodes it must be an address the other nodes
reach.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from .._errors import ConfigError

__all__ = ["RayWorker", "ensure_ray"]


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--launcher ray needs Ray: pip install 'stagewise[ray]' (or use --launcher local)") from exc
    return ray


def ensure_ray(workers: int) -> bool:
    """Connect to the Ray cluster (``RAY_ADDRESS``) or start a local one with room for ``workers`` actors; True when
    this call started it (the caller shuts it down)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    env = {"env_vars": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "PYTHONPATH") if k in os.environ}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True, configure_logging=False)
        return False
    ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False, runtime_env=env,
             _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)
    return True


class _Stage:
    """The actor: one worker process."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, config_json: str, assignment: bytes) -> None:
        from ._worker import worker_main

        worker_main(config_json, assignment)


class RayWorker:
    """A stage worker in a Ray actor, with the ``multiprocessing.Process`` surface the supervisor uses."""

    def __init__(self, *, args: tuple[str, bytes], name: str) -> None:
        self.name = name
        self._args = args
        self._ray = _ray()
        self._actor: Any = None
        self._pid_ref: Any = None
        self._ref: Any = None
        self._pid: int | None = None
        self._exitcode: int | None = None

    def start(self) -> None:
        remote = self._ray.remote(num_cpus=1, max_restarts=0)(_Stage)
        self._actor = remote.remote()
        self._pid_ref = self._actor.pid.remote()
        self._ref = self._actor.run.remote(*self._args)

    @property
    def pid(self) -> int | None:
        """The actor's process id once Ray started it (None before)."""
        if self._pid is None and self._pid_ref is not None:
            ready, _ = self._ray.wait([self._pid_ref], timeout=0)
            if ready:
                try:
                    self._pid = self._ray.get(self._pid_ref)
                except Exception:  # noqa: BLE001 - died before it could say: no pid to ask about
                    self._pid_ref = None
        return self._pid

    @property
    def exitcode(self) -> int | None:
        """None while the worker runs; 0 when it returned, 1 when it failed, -SIGKILL when its actor died."""
        if self._exitcode is None and self._ref is not None:
            ready, _ = self._ray.wait([self._ref], timeout=0)
            if ready:
                try:
                    self._ray.get(self._ref)
                    self._exitcode = 0
                except self._ray.exceptions.RayTaskError:
                    self._exitcode = 1
                except Exception:  # noqa: BLE001 - the actor died (killed, os._exit, its node lost)
                    self._exitcode = -signal.SIGKILL
        return self._exitcode

    def kill(self) -> None:
        if self._actor is not None:
            self._ray.kill(self._actor, no_restart=True)

    def join(self, timeout: float | None = None) -> None:
        if self._ref is not None:
            self._ray.wait([self._ref], timeout=timeout)

    def close(self) -> None:
        """Release the actor (its process ends, if it has not)."""
        self.kill()
        self._actor = None
