"""Every way a Stagewise process starts: local ranks from a forkserver (the embedded default), ranks as Ray actors
(:func:`ray_spawn`, the same contract on a Ray cluster), a rank that torchrun started, and the planner's probes that
need fresh processes.

>>> from stagewise.launch import spawn
>>> spawn(fn, 2, args=(...,), timeout=60)               # doctest: +SKIP
>>> env = torchrun_env()                                # None unless torchrun started this process  # doctest: +SKIP

:func:`spawn` runs ``fn(rank, world_size, port, *args)`` in one process per rank, propagates the first failure, kills
every rank at its deadline, and turns SIGINT/SIGTERM of the launcher into a stop at the ranks' next step boundary
(:func:`stop_requested`). Nothing it starts outlives it.
"""

from ..comm import SpawnError
from ._optimizer import profile_model, time_optimizer
from ._probe import calibrate, measure_action_overhead, measure_host_links, measure_links
from ._ray import ray_spawn
from ._spawn import STOP_SIGNAL, describe_exit, forkserver_context, rendezvous_host, spawn, stop_requested
from ._torchrun import TorchrunEnv, connect_torchrun, torchrun_env

__all__ = [
    "STOP_SIGNAL",
    "SpawnError",
    "TorchrunEnv",
    "calibrate",
    "connect_torchrun",
    "describe_exit",
    "forkserver_context",
    "measure_action_overhead",
    "measure_host_links",
    "measure_links",
    "profile_model",
    "ray_spawn",
    "rendezvous_host",
    "spawn",
    "stop_requested",
    "time_optimizer",
    "torchrun_env",
]
