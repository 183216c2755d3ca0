"""An in-process transport for unit tests: ranks are threads sharing one :class:`LocalHub`.

Messages go through the same framing as on the wire (header, descriptors, byte buffers) and are snapshots taken at
send time, so nothing aliases between ranks. Like gloo, a send completes only when the receiver has taken the message,
so schedules that would deadlock on gloo deadlock (and time out) here too.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from ._errors import CommTimeoutError
from ._expect import check_expect
from ._framing import Frame, Value, encode, materialise, parse_descriptors, parse_header
from ._transport import CommGroup, ReduceOp, SendHandle, Transport

__all__ = ["LocalHub", "LocalTransport"]


@dataclasses.dataclass
class _Envelope:
    frame: Frame
    taken: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass
class _Round:
    """One collective call: what each rank brought, and how many have not read the result yet."""

    kind: str
    contributions: dict[int, Any]
    unread: int


class LocalHub:
    """The shared state of ``world_size`` in-process ranks: ``LocalHub(2).transport(0)`` is rank 0's transport."""

    def __init__(self, world_size: int, *, timeout: float = 30.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self._cv = threading.Condition()
        self._queues: dict[tuple[int, int, int], collections.deque[_Envelope]] = collections.defaultdict(
            collections.deque)
        self._rounds: dict[tuple[tuple[int, ...], int], _Round] = {}

    def transport(self, rank: int, *, device: torch.device | str | None = None) -> LocalTransport:
        """Rank ``rank``'s transport; received tensors land on ``device`` (default: where the sender's were)."""
        return LocalTransport(self, rank=rank, device=None if device is None else torch.device(device))

    # -- point to point ------------------------------------------------------------------------------------------
    def _put(self, key: tuple[int, int, int], env: _Envelope) -> None:
        with self._cv:
            self._queues[key].append(env)
            self._cv.notify_all()

    def _take(self, key: tuple[int, int, int], deadline: float) -> _Envelope | None:
        with self._cv:
            queue = self._queues[key]
            while not queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            env = queue.popleft()
        env.taken.set()
        return env

    # -- collectives ---------------------------------------------------------------------------------------------
    def _rendezvous(self, *, ranks: tuple[int, ...], seq: int, rank: int, kind: str, contribution: Any,
                    timeout: float, deadline: float) -> dict[int, Any]:
        """Deposit ``contribution`` for round ``seq`` of group ``ranks``; return everyone's once all arrived."""
        key = (ranks, seq)
        with self._cv:
            rnd = self._rounds.setdefault(key, _Round(kind=kind, contributions={}, unread=len(ranks)))
            if rnd.kind != kind:
                raise ValueError(f"rank {rank} called {kind} on group {ranks} while another rank called {rnd.kind} "
                                 "as the same collective; every rank must call collectives in the same order")
            rnd.contributions[rank] = contribution
            self._cv.notify_all()
            while len(rnd.contributions) < len(ranks):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(ranks) - set(rnd.contributions))
                    del rnd.contributions[rank]
                    if not rnd.contributions:
                        del self._rounds[key]
                    raise CommTimeoutError(op=kind, rank=rank, peer=None, tag=None, waited=timeout,
                                           detail=f"group {list(ranks)} never heard from ranks {missing}")
                self._cv.wait(left)
            rnd.unread -= 1
            if rnd.unread == 0:
                del self._rounds[key]
            return dict(rnd.contributions)


class _LocalSendHandle(SendHandle):
    def __init__(self, transport: LocalTransport, env: _Envelope, *, dst: int, tag: int) -> None:
        self._transport, self._env, self._dst, self._tag = transport, env, dst, tag

    def wait(self, timeout: float | None = None) -> None:
        t, _ = self._transport._deadline(timeout)
        if not self._env.taken.wait(t):
            raise CommTimeoutError(op="send", rank=self._transport.rank, peer=self._dst, tag=self._tag, waited=t,
                                   detail="the receiver never took the message")


class LocalTransport(Transport):
    """Rank ``rank`` of a :class:`LocalHub`; made by :meth:`LocalHub.transport`."""

    def __init__(self, hub: LocalHub, *, rank: int, device: torch.device | None = None) -> None:
        super().__init__(rank=rank, world_size=hub.world_size, timeout=hub.timeout)
        self.hub = hub
        self.device = device
        self._seq: dict[tuple[int, ...], int] = collections.defaultdict(int)

    def isend(self, values: Sequence[Value], *, dst: int, tag: int = 0) -> SendHandle:
        self._check_peer(dst, name="dst")
        self._check_tag(tag)
        env = _Envelope(encode(values, src=self.rank, tag=tag, copy=True))
        self.hub._put((self.rank, dst, tag), env)
        return _LocalSendHandle(self, env, dst=dst, tag=tag)

    def recv(self, *, src: int, tag: int = 0, timeout: float | None = None,
             expect: Sequence[Any] | None = None) -> list[Value]:
        self._check_peer(src, name="src")
        self._check_tag(tag)
        t, deadline = self._deadline(timeout)
        env = self.hub._take((src, self.rank, tag), deadline)
        if env is None:
            raise CommTimeoutError(op="recv", rank=self.rank, peer=src, tag=tag, waited=t)
        frame = env.frame
        parse_header(frame.header, src=src, tag=tag)
        descs = parse_descriptors(frame.header, frame.extension)
        payloads = frame.payloads if self.device is None else [p.to(self.device) for p in frame.payloads]
        device = self.device or (payloads[0].device if payloads else torch.device("cpu"))
        values = materialise(descs, payloads, device)
        check_expect(values, expect, where=f"recv on rank {self.rank} from rank {src} (tag {tag})")
        return values

    def _collective(self, group: CommGroup, kind: str, contribution: Any, timeout: float | None) -> dict[int, Any]:
        t, deadline = self._deadline(timeout)
        seq = self._seq[group.ranks]
        self._seq[group.ranks] += 1
        return self.hub._rendezvous(ranks=group.ranks, seq=seq, rank=self.rank, kind=kind, contribution=contribution,
                                    timeout=t, deadline=deadline)

    def all_reduce(self, tensor: torch.Tensor, *, group: CommGroup | None = None, op: ReduceOp = "sum",
                   timeout: float | None = None) -> None:
        self._check_reduce(tensor, op)
        g = self._resolve_group(group, op="all_reduce")
        got = self._collective(g, "all_reduce", (op, tensor.detach().clone()), timeout)
        for r, (other_op, other) in got.items():
            if other_op != op or other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise ValueError(
                    f"all_reduce on group {g.ranks}: rank {self.rank} passed op={op} shape {tuple(tensor.shape)} "
                    f"{tensor.dtype}, rank {r} passed op={other_op} shape {tuple(other.shape)} {other.dtype}")
        total = got[g.ranks[0]][1].clone()
        for r in g.ranks[1:]:  # fixed rank order: every rank computes the identical result
            total += got[r][1].to(total.device)
        if op == "mean":
            total /= g.size
        with torch.no_grad():
            tensor.copy_(total)

    def broadcast(self, tensor: torch.Tensor, *, src: int, group: CommGroup | None = None,
                  timeout: float | None = None) -> None:
        g = self._resolve_group(group, op="broadcast")
        if src not in g.ranks:
            raise ValueError(f"broadcast src={src} is not in group {g.ranks}")
        mine = tensor.detach().clone() if self.rank == src else None
        got = self._collective(g, "broadcast", (src, tuple(tensor.shape), tensor.dtype, mine), timeout)
        srcs = {v[0] for v in got.values()}
        if srcs != {src}:
            raise ValueError(f"broadcast on group {g.ranks}: ranks disagree on src ({sorted(srcs)})")
        _, shape, dtype, data = got[src]
        if shape != tuple(tensor.shape) or dtype != tensor.dtype:
            raise ValueError(f"broadcast from rank {src}: it has shape {shape} {dtype}, rank {self.rank} has "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        if self.rank != src:
            with torch.no_grad():
                tensor.copy_(data)

    def new_group(self, ranks: Sequence[int]) -> CommGroup:
        return CommGroup(ranks=self._check_group_ranks(ranks))

    def barrier(self, timeout: float | None = None) -> None:
        self._collective(self._resolve_group(None, op="barrier"), "barrier", None, timeout)

    def close(self) -> None:
        self._closed = True
