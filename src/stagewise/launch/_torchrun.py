"""Running as one rank that torchrun started: detect it (the CLI's one read of torchrun's environment), then join
the process group through torchrun's own rendezvous."""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from collections.abc import Mapping
from typing import Any

import torch

from ..comm import DistTransport, RendezvousError, use_interface

__all__ = ["TorchrunEnv", "connect_torchrun", "torchrun_env"]

_REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class TorchrunEnv:
    """Where torchrun placed this process."""

    rank: int
    """Global rank (``RANK``)."""
    world_size: int
    """Processes in the job (``WORLD_SIZE``)."""
    local_rank: int
    """Rank on this host (``LOCAL_RANK``; picks the GPU)."""
    local_world_size: int
    """Processes on this host (``LOCAL_WORLD_SIZE``)."""
    master_addr: str
    """Host of the rendezvous store (``MASTER_ADDR``)."""
    master_port: int
    """Port of the rendezvous store (``MASTER_PORT``)."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"torchrun environment: need 0 <= RANK < WORLD_SIZE, got RANK={self.rank} "
                             f"WORLD_SIZE={self.world_size}")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"torchrun environment: MASTER_PORT must be a TCP port, got {self.master_port}")


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """The placement torchrun gave this process, or None when torchrun did not start it (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` not all set). ``environ`` defaults to ``os.environ``: call this once, where
    the command line starts, and hand the record on."""
    env = os.environ if environ is None else environ
    if not all(env.get(k) for k in _REQUIRED):
        return None
    try:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        return TorchrunEnv(rank=rank, world_size=world_size, local_rank=int(env.get("LOCAL_RANK") or rank),
                           local_world_size=int(env.get("LOCAL_WORLD_SIZE") or world_size),
                           master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]))
    except ValueError as exc:
        raise ValueError(f"torchrun environment is not valid: {exc}") from None


def connect_torchrun(env: TorchrunEnv, *, backend: str = "gloo", timeout: float = 30.0,
                     device: torch.device | str | None = None, iface: str | None = None) -> DistTransport:
    """Join the process group of the torchrun job ``env`` describes, through torchrun's rendezvous (its agent's store
    when torchrun runs one); the GPU, with NCCL or a CUDA ``device``, is ``local_rank % device_count``.

    ``iface``: the network interface gloo and NCCL use (``--iface``; else they pick one by the host name). Failing to
    reach the rendezvous or the peers is a :class:`~stagewise.comm.RendezvousError` naming this host, the store's
    address and port, and the interface tried."""
    import torch.distributed as dist

    tried = f"interface {iface} ({use_interface(iface)})" if iface else _default_interface()
    try:
        store: Any
        store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                           timeout=datetime.timedelta(seconds=timeout)))
        # The agent's store outlives a restart (torchrun --max-restarts): keys of each attempt apart, so a restarted
        # rank never reads a dead peer's address (or stages) that the attempt before it left there.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"stagewise/attempt{attempt}/", store)
        return DistTransport.init(rank=env.rank, world_size=env.world_size, master_addr=env.master_addr,
                                  master_port=env.master_port, backend=backend, timeout=timeout, device=device,
                                  local_rank=env.local_rank, store=store)
    except (RuntimeError, OSError) as exc:  # torch's DistNetworkError/DistStoreError, gloo's connect failures
        if dist.is_initialized():
            dist.destroy_process_group()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RendezvousError(
            f"rank {env.rank} on host {socket.gethostname()} could not join the job through the rendezvous at "
            f"{env.master_addr}:{env.master_port} using {tried} within {timeout:g} s: {first}. Check that "
            f"{env.master_addr}:{env.master_port} is reachable from this host, and name the interface that reaches the "
            "other hosts with --iface") from exc


def _default_interface() -> str:
    """How gloo picks this host's address without ``--iface``: by its host name (or GLOO_SOCKET_IFNAME if set)."""
    named = os.environ.get("GLOO_SOCKET_IFNAME")
    if named:
        return f"interface {named} (GLOO_SOCKET_IFNAME)"
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError:
        addr = "which does not resolve"
    return f"the interface of host name {host} ({addr}; name one with --iface)"
