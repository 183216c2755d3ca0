"""The transport seam: the interface every stage worker uses to exchange values, whatever carries them.

Semantics every implementation keeps (so a unit test on :class:`LocalTransport` predicts a run on gloo):

- Messages on one ``(src, dst, tag)`` channel arrive in the order sent. Different tags are independent channels
  on backends that honour tags (gloo, local); NCCL ignores tags, so there a frame whose tag differs from the awaited one
  raises :class:`FramingError` instead of being silently misdelivered.
- ``send`` is a rendezvous: it returns once the receiver has taken the message (as gloo does). Two ranks that both
  ``send`` to each other before receiving deadlock until the timeout; post ``isend`` first, then ``recv``, then wait.
  (:class:`ShmTransport` completes a send once the message is in its ring, a weaker condition: what is correct on
  gloo stays correct there.)
- Between ``isend`` and ``handle.wait()`` the caller must not modify the tensors sent.
- Every wait has a deadline (``timeout`` seconds, default :attr:`Transport.timeout`) and raises
  :class:`CommTimeoutError` naming ranks, tag and seconds. Collectives must be called by every rank of the group in the
  same order. On torch.distributed a timeout usually leaves the link unusable: close the transport.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch

from ._errors import TransportClosedError
from ._framing import Value

__all__ = ["MAX_TAG", "CommGroup", "ReduceOp", "SendHandle", "Transport"]

ReduceOp = Literal["sum", "mean"]
MAX_TAG = 2**31 - 1
"""Largest tag accepted (gloo maps tags to 32-bit slots)."""


@dataclasses.dataclass(frozen=True)
class CommGroup:
    """A set of ranks that run collectives together; made by :meth:`Transport.new_group`."""

    ranks: tuple[int, ...]
    """Global ranks in the group, ascending."""
    handle: Any = dataclasses.field(default=None, compare=False, repr=False)
    """The backend's own group object (a ``torch.distributed.ProcessGroup``; None for the world or locally)."""

    @property
    def size(self) -> int:
        return len(self.ranks)


class SendHandle(abc.ABC):
    """An in-flight :meth:`Transport.isend`; keeps the sent tensors alive until it completes."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block until the receiver has taken the message; :class:`CommTimeoutError` after ``timeout`` seconds."""


class Transport(abc.ABC):
    """Point-to-point messages of :data:`Value` lists plus the collectives a pipeline needs.

    Implementations: :class:`DistTransport` (torch.distributed), :class:`ShmTransport` (shared memory on one host,
    collectives on gloo) and :class:`LocalTransport` (threads, for tests).
    Each transport is used by one thread at a time.
    """

    rank: int
    """This worker's global rank."""
    world_size: int
    """Number of ranks."""
    timeout: float
    """Default deadline in seconds for every wait that is not given its own."""

    def __init__(self, *, rank: int, world_size: int, timeout: float) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.rank = rank
        self.world_size = world_size
        self.timeout = float(timeout)
        self._closed = False
        self.world = CommGroup(ranks=tuple(range(world_size)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"

    # -- point to point ------------------------------------------------------------------------------------------
    def send(self, values: Sequence[Value], *, dst: int, tag: int = 0, timeout: float | None = None) -> None:
        """Send ``values`` to ``dst`` and wait until it has taken them."""
        self.isend(values, dst=dst, tag=tag).wait(timeout)

    @abc.abstractmethod
    def isend(self, values: Sequence[Value], *, dst: int, tag: int = 0) -> SendHandle:
        """Start sending ``values`` to ``dst``; the returned handle's ``wait`` completes the send."""

    @abc.abstractmethod
    def recv(self, *, src: int, tag: int = 0, timeout: float | None = None,
             expect: Sequence[Any] | None = None) -> list[Value]:
        """Receive the next message from ``src`` on ``tag``.

        ``expect``: optional specs, one per value (see :func:`~stagewise.comm.check_expect`); a mismatch raises
        :class:`BoundaryMismatchError` after the whole message was received, so the channel stays usable.
        """

    def post_recv(self, *, src: int, tag: int = 0) -> None:  # noqa: B027 - optional, a no-op by default
        """Start receiving the next message from ``src`` on ``tag`` now, so its bytes can land while this rank
        computes; the next :meth:`recv` with the same ``src`` and ``tag`` completes it. A hint: transports that cannot
        receive ahead ignore it."""

    # -- collectives ---------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor, *, group: CommGroup | None = None, op: ReduceOp = "sum",
                   timeout: float | None = None) -> None:
        """Reduce ``tensor`` in place across ``group`` (default: all ranks); ``mean`` needs a floating dtype."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, *, src: int, group: CommGroup | None = None,
                  timeout: float | None = None) -> None:
        """Overwrite ``tensor`` in place on every rank of ``group`` with global rank ``src``'s."""

    @abc.abstractmethod
    def new_group(self, ranks: Sequence[int]) -> CommGroup:
        """A group of ``ranks``. On torch.distributed every rank must call this, in the same order."""

    @abc.abstractmethod
    def barrier(self, timeout: float | None = None) -> None:
        """Wait until every rank reached the barrier."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release resources; idempotent. The transport cannot be used afterwards."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared argument checks ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosedError(f"rank {self.rank}: {type(self).__name__} used after close()")

    def _check_peer(self, peer: int, *, name: str) -> None:
        self._check_open()
        if not isinstance(peer, int) or not 0 <= peer < self.world_size:
            raise ValueError(f"{name} must be a rank in [0, {self.world_size}), got {peer!r}")
        if peer == self.rank:
            raise ValueError(f"{name}={peer} is this rank itself; point-to-point messages need another rank")

    @staticmethod
    def _check_tag(tag: int) -> None:
        if not isinstance(tag, int) or not 0 <= tag <= MAX_TAG:
            raise ValueError(f"tag must be an int in [0, {MAX_TAG}], got {tag!r}")

    def _deadline(self, timeout: float | None) -> tuple[float, float]:
        """``(timeout, absolute monotonic deadline)`` for a wait."""
        t = self.timeout if timeout is None else float(timeout)
        if not t > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        return t, time.monotonic() + t

    def _resolve_group(self, group: CommGroup | None, *, op: str) -> CommGroup:
        self._check_open()
        g = self.world if group is None else group
        if self.rank not in g.ranks:
            raise ValueError(f"rank {self.rank} called {op} on group {g.ranks} it is not a member of")
        return g

    def _check_group_ranks(self, ranks: Sequence[int]) -> tuple[int, ...]:
        self._check_open()
        out = tuple(sorted(int(r) for r in ranks))
        if not out or len(set(out)) != len(out) or out[0] < 0 or out[-1] >= self.world_size:
            raise ValueError(f"new_group ranks must be distinct ranks in [0, {self.world_size}), got {list(ranks)}")
        return out

    @staticmethod
    def _check_reduce(tensor: torch.Tensor, op: str) -> None:
        if op not in ("sum", "mean"):
            raise ValueError(f"op must be 'sum' or 'mean', got {op!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"all_reduce needs a torch.Tensor, got {type(tensor).__name__}")
        if op == "mean" and not (tensor.is_floating_point() or tensor.is_complex()):
            raise ValueError(f"op='mean' needs a floating-point tensor, got {tensor.dtype}; use op='sum'")
