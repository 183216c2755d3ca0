"""What a pipeline backend is made of: its configuration, the state of each replica and of each batch in flight."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import torch

from ._channel import Channel
from ._config import PipelineConfig

__all__ = ["PendingBatch", "PipelineConfig", "RemoteWorker", "ReplicaState", "ReplicaStatus", "settle"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class ReplicaStatus:
    """A snapshot of one replica."""

    index: int
    generation: int
    """How many times it was started."""
    state: str
    """``starting``, ``ready``, ``failed`` (restart pending), ``restarting`` or ``stopped``."""
    pids: tuple[int, ...]
    """Worker process ids by stage (empty while none run)."""
    inflight: int
    """Batches dispatched to it and not yet answered."""
    completed: int
    """Batches it answered, over all its generations."""
    last_error: str | None
    """Why it last failed."""
    version: str = ""
    """The weights version it runs (``model_version`` of its answers)."""


@dataclasses.dataclass(eq=False)
class PendingBatch:
    """A batch the backend accepted and has not answered: queued, or in flight on one replica."""

    inputs: dict[str, torch.Tensor]
    rows: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[dict[str, torch.Tensor]]
    """Settled on ``loop`` only (reader and supervisor threads go through :func:`settle`)."""
    attempts: int = 0
    sent_at: float = 0.0
    """When it was last dispatched (``time.monotonic``)."""


@dataclasses.dataclass(eq=False)
class ReplicaState:
    """One replica's processes, channels and batches in flight (guarded by the backend's lock)."""

    index: int
    generation: int = 0
    state: str = "failed"
    procs: list[Any] = dataclasses.field(default_factory=list)
    conns: dict[int, Channel] = dataclasses.field(default_factory=dict)
    ready: set[int] = dataclasses.field(default_factory=set)
    beats: dict[int, float] = dataclasses.field(default_factory=dict)
    """Last message (any kind counts as a heartbeat) from each connected stage, ``time.monotonic``."""
    inflight: dict[int, PendingBatch] = dataclasses.field(default_factory=dict)
    next_seq: int = 0
    dist_port: int = 0
    remote_configs: dict[int, str] = dataclasses.field(default_factory=dict)
    """Stage -> the WorkerConfig (JSON) a worker joining from another host gets for this generation."""
    joining: set[int] = dataclasses.field(default_factory=set)
    """Remote stages being handed to a joining worker."""
    """The rendezvous port of the current generation's workers (it also names their shared-memory rings)."""
    started_at: float = 0.0
    restart_at: float = 0.0
    failures: int = 0
    completed: int = 0
    last_error: str | None = None
    crash: str | None = None
    version_id: int = 0
    """The weights version its stage 0 runs now (see ``_live_update``), and its label."""
    version: str = ""


class RemoteWorker:
    """The supervisor's stand-in for a worker on another host: no process here to watch or kill; its channel's end
    is its death, and closing the channel (the gateway does on failure and shutdown) ends it."""

    pid = None

    def __init__(self, name: str) -> None:
        self.name = name
        self.exitcode: int | None = None

    def start(self) -> None:
        pass

    def kill(self) -> None:
        self.exitcode = -9

    def join(self, timeout: float | None = None) -> None:
        self.exitcode = 0 if self.exitcode is None else self.exitcode

    def close(self) -> None:
        pass


def settle(req: PendingBatch, *, result: Any = None, error: BaseException | None = None) -> None:
    """Settle ``req`` from any thread (its future belongs to the event loop that awaits it)."""

    def on_loop() -> None:
        if req.future.done():  # cancelled by the waiter in between
            return
        if error is not None:
            req.future.set_exception(error)
        else:
            req.future.set_result(result)

    try:
        req.loop.call_soon_threadsafe(on_loop)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass
