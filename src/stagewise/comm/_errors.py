"""Everything :mod:`stagewise.comm` raises on purpose.

Exception tree::

    CommError                                   base class: catch this to catch any transport failure
    ├── CommTimeoutError(CommError, TimeoutError)       a wait passed its deadline (peer dead, or schedule wrong)
    ├── BoundaryMismatchError(CommError, ValueError)    received values do not match the receiver's ``expect`` specs
    ├── FramingError(CommError, ValueError)             a message is not a Stagewise frame, or is on the wrong tag
    ├── TransportClosedError(CommError, RuntimeError)   the transport was used after ``close()``
    ├── SpawnError(CommError, RuntimeError)             a worker started by ``launch.spawn`` failed or ran out of time
    └── RendezvousError(CommError, ConnectionError)     a rank could not join its process group (host, port, interface)

Errors say what happened and where (rank, peer, tag, seconds) and, when there is one, what to change.
"""

from __future__ import annotations

from .._errors import StagewiseError

__all__ = [
    "BoundaryMismatchError",
    "CommError",
    "CommTimeoutError",
    "FramingError",
    "RendezvousError",
    "SpawnError",
    "TransportClosedError",
]


class CommError(StagewiseError):
    """Base class of every error raised on purpose by :mod:`stagewise.comm`."""


class CommTimeoutError(CommError, TimeoutError):
    """A send, recv or collective did not complete before its deadline.

    ``op`` is ``"send"``, ``"recv"``, ``"all_reduce"``, ``"broadcast"`` or ``"barrier"``; ``peer`` is the other rank of
    a point-to-point operation (None for collectives); ``waited`` is in seconds.
    """

    def __init__(
        self,
        *,
        op: str,
        rank: int,
        peer: int | None,
        tag: int | None,
        waited: float,
        detail: str = "",
    ) -> None:
        self.op = op
        self.rank = rank
        self.peer = peer
        self.tag = tag
        self.waited = waited
        if peer is None:
            where = f"rank {rank}: {op}"
        else:
            direction = "to" if op == "send" else "from"
            where = f"rank {rank}: {op} {direction} rank {peer} (tag {tag})"
        hint = (
            "the peer may have died or be stuck, or the schedule on the two ranks does not match "
            "(a send with no matching recv); raise the timeout only if the peer is just slow"
        )
        msg = f"{where} timed out after {waited:.1f} s; {hint}"
        if detail:
            msg += f" [{detail}]"
        super().__init__(msg)


class BoundaryMismatchError(CommError, ValueError):
    """Values received at a stage boundary do not match what the receiver expected.

    ``index`` is the position of the first offending value (None when the value count differs).
    """

    def __init__(self, message: str, *, index: int | None, expected: str, received: str) -> None:
        self.index = index
        self.expected = expected
        self.received = received
        super().__init__(message)


class FramingError(CommError, ValueError):
    """A received message is not a valid Stagewise frame (wrong magic, version, sender or tag)."""


class TransportClosedError(CommError, RuntimeError):
    """The transport was used after :meth:`~stagewise.comm.Transport.close`."""


class SpawnError(CommError, RuntimeError):
    """A worker process started by :func:`stagewise.launch.spawn` failed, or the deadline passed.

    ``failures`` maps rank to the traceback text (or exit description) of each failed rank, in detection order, the
    first being the likely root cause; ``timed_out`` is True when the deadline passed first; ``signum`` is the signal
    (SIGINT, SIGTERM) that asked the run to stop, when one did.
    """

    def __init__(self, message: str, *, failures: dict[int, str], timed_out: bool, signum: int | None = None) -> None:
        self.failures = failures
        self.timed_out = timed_out
        self.signum = signum
        super().__init__(message)


class RendezvousError(CommError, ConnectionError):
    """A rank could not reach its rendezvous or its peers: the message names the host, the port and the network
    interface it tried, and how to name another (``--iface``)."""
