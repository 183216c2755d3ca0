"""The serving configuration, apart from the machinery it configures: ``stagewise serve --help`` is built from it
without importing torch."""

from __future__ import annotations

import dataclasses
from typing import Literal

from .._errors import ConfigError
from .._settings import flag_of

__all__ = ["PipelineConfig"]


@dataclasses.dataclass(kw_only=True, slots=True)
class PipelineConfig:
    """How a model is split and replicated for serving (``stagewise serve`` has one flag per field)."""

    model: str = dataclasses.field(metadata={"metavar": "MODEL|CHECKPOINT"})
    """Model factory, 'path/to/file.py:factory' or 'package.module:factory' (on the command line also a training
    checkpoint directory, which records its model)."""
    stages: int = 2
    """Pipeline stages per replica (worker processes per replica)."""
    replicas: int = 1
    """Independent pipeline replicas."""
    max_batch_size: int = 32
    """Most rows per batch; batches are padded to the next power of two (capped here) so captures stay few."""
    name: str | None = None
    """Model name in the URL; None uses the factory's ``ModelSpec.name``."""
    host: str = dataclasses.field(default="127.0.0.1", metadata={"cli": False})
    """Address the worker channel listens on (workers are local processes)."""
    threads_per_worker: int | None = dataclasses.field(default=None, metadata={"flag": "--threads"})
    """torch threads per worker; None shares the CPU cores evenly among the workers and this process (at least 1)."""
    exclude_inputs: tuple[str, ...] = dataclasses.field(default=("labels",), metadata={"metavar": "NAME,..."})
    """Keyword example inputs not served (a Hugging Face model given ``labels`` returns a batch-less loss)."""
    seed: int = 0
    """torch seed set before every process calls the factory, so unseeded factories build the same weights."""
    inflight_per_replica: int | None = None
    """Batches in one replica at once; None = ``stages``."""
    max_attempts: int = 3
    """Times a batch is dispatched before it fails because replicas kept dying under it."""
    request_timeout_s: float = dataclasses.field(default=60.0, metadata={"flag": "--request-timeout"})
    """Longest a batch may take in the backend, waiting included."""
    worker_timeout_s: float = dataclasses.field(default=60.0, metadata={"flag": "--worker-timeout"})
    """Longest a batch may stay in a replica before the replica counts as stuck (killed, restarted, batch retried);
    also the deadline of its rendezvous and of every send between its stages."""
    heartbeat_timeout_s: float = dataclasses.field(default=5.0, metadata={"flag": "--heartbeat-timeout"})
    """A worker silent this long (it sends a heartbeat every fifth of it, from a thread of its own, so a long forward
    does not count) is stopped or hung: its replica fails and its batches move to another replica. Also the time a
    connecting worker has for its hello."""
    startup_timeout_s: float = dataclasses.field(default=120.0, metadata={"flag": "--replica-startup-timeout"})
    """A replica not ready this long after its start is restarted."""
    restart_backoff_s: float = dataclasses.field(default=0.5, metadata={"flag": "--restart-backoff"})
    """Delay before restarting a replica that failed while starting; doubles per failure (up to 10 s)."""
    checkpoint: str | None = dataclasses.field(default=None, metadata={"metavar": "DIR"})
    """A training checkpoint directory whose weights (by FQN, any layout) the workers load."""
    weights: str | None = dataclasses.field(default=None, metadata={"metavar": "PATH"})
    """Weights to serve: a Hugging Face model folder, a .safetensors file or a state_dict file (each worker reads
    only its stage's tensors; with weights from a file nobody builds the whole model)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype (files are read straight into it)."""
    remote: tuple[str, ...] = dataclasses.field(default=(), metadata={"metavar": "REPLICA:STAGE,..."})
    """Chain positions run by workers on other hosts, as REPLICA:STAGE (STAGE >= 1: stage 0 of every replica runs
    here): no process is started here for them; 'stagewise worker --join' on another host takes them."""
    worker_listen: str | None = dataclasses.field(default=None, metadata={"metavar": "HOST:PORT"})
    """Where workers of other hosts join (with --remote; they must answer a challenge keyed by --token or
    STAGEWISE_TOKEN); a replica with remote stages also rendezvous on HOST."""
    join_token: str | None = dataclasses.field(default=None, metadata={"cli": False})  # set from --token
    """The secret remote workers prove they know (HMAC challenge; it never travels)."""
    launcher: Literal["local", "ray"] = "local"
    """What starts the stage workers: local (processes on this machine) or ray (one actor per worker on the Ray
    cluster RAY_ADDRESS names, else on a local Ray started for the service; needs stagewise[ray])."""
    transport: Literal["auto", "shm", "gloo"] = "auto"
    """How activations move between the stages of a replica: shm (shared-memory rings; every stage of a replica
    on this machine), gloo (TCP), or auto (gloo today: see bench/serve.py for the two side by side)."""
    cuts: tuple[str, ...] | None = dataclasses.field(default=None, metadata={"cli": False})  # set by --plan
    """Cut before these units (e.g. from a plan) instead of balancing by parameters."""
    tasks: tuple[str, ...] | None = dataclasses.field(default=None, metadata={"cli": False})  # set by --tasks
    """Task split: the head FQNs of the model; ``head`` is the one this backend serves after the trunk."""
    head: str | None = dataclasses.field(default=None, metadata={"cli": False})
    """Serve the trunk (``stages - 1`` stages) plus this task head as its own model (named ``name.head``)."""
    submodule: str | None = dataclasses.field(default=None, metadata={"cli": False})  # set by --submodels
    """Serve only this sub-model (by FQN, e.g. ``encoder``) on the inputs it receives, named ``name.FQN``."""

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> ConfigError:
            return ConfigError(f"PipelineConfig.{field} must be {rule}, got {getattr(self, field)!r}; "
                               f"set {flag_of(PipelineConfig, field)}")

        for field in ("stages", "replicas", "max_batch_size", "max_attempts"):
            if getattr(self, field) < 1:
                raise bad(field, ">= 1")
        for field in ("threads_per_worker", "inflight_per_replica"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise bad(field, ">= 1 or None")
        for field in ("request_timeout_s", "worker_timeout_s", "startup_timeout_s", "heartbeat_timeout_s"):
            if not getattr(self, field) > 0:
                raise bad(field, "> 0")
        if self.restart_backoff_s < 0:
            raise bad("restart_backoff_s", ">= 0")
        if self.name is not None and (not self.name or "/" in self.name):
            raise bad("name", "a non-empty string without '/'")
        self.exclude_inputs = tuple(self.exclude_inputs)
        self.remote = tuple(self.remote)
        for slot in self.remote:
            r, _, st = slot.partition(":")
            if not (r.isdigit() and st.isdigit() and int(r) < self.replicas and 1 <= int(st) < self.stages):
                raise ConfigError(f"--remote {slot!r} must be REPLICA:STAGE with 0 <= REPLICA < {self.replicas} and "
                                  f"1 <= STAGE < {self.stages} (stage 0 runs beside the gateway)")
        if self.remote and self.worker_listen is None:
            raise ConfigError("--remote stages join over the network: give --worker-listen HOST:PORT (an address "
                              "of this host the workers' hosts reach)")
        if self.worker_listen is not None:
            host, _, port = self.worker_listen.rpartition(":")
            if not host or not port.isdigit() or not self.remote:
                raise ConfigError(f"--worker-listen must be HOST:PORT and comes with --remote, got "
                                  f"{self.worker_listen!r}")
        if self.remote and self.transport == "shm":
            raise ConfigError("--transport shm needs every stage of a replica on one host; --remote puts some on "
                              "others: use --transport auto")

    def remote_slots(self) -> set[tuple[int, int]]:
        """The (replica, stage) positions ``remote`` names."""
        return {(int(r), int(s)) for r, _, s in (slot.partition(":") for slot in self.remote)}
