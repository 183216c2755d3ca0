"""The shared-memory transport: point-to-point messages between ranks on one host through preallocated rings, the
collectives on a gloo group kept alongside.

How a message travels: the sender frames it exactly as on gloo (``_framing``: header, optional descriptor extension,
pack of small tensors, then each large tensor's bytes) and writes that byte stream into the ring of the pair
(``_shm_ring``). The header and pack are written in place in the ring when they fit in one piece; large tensors are
copied straight from the caller's memory. Values larger than the ring flow through it in chunks while the receiver
copies them out. The receiver allocates each tensor from the header and copies its bytes once out of the ring (small
tensors straight from the ring when the pack arrived in one piece). No pickle anywhere; ``expect`` is checked as on
gloo.

Differences from :class:`DistTransport` a schedule can see (none that makes a correct gloo schedule wrong):

- ``send`` completes once the whole message is *in the ring*, not when the receiver took it; a message larger than
  the free space completes as the receiver drains it. Whenever a rank waits for anything (a ``recv``, a send), it
  advances its sends in progress and takes every message that has arrived (kept for its ``recv``), so two ranks that
  both send before receiving, which deadlock on gloo, complete here.
- Different tags on one pair share the ring: a ``recv`` that meets a message for another tag receives it into its own
  buffers and keeps it for the ``recv`` of that tag (one copy either way). ``post_recv`` is a no-op: the ring always
  receives ahead.
- Waiting spins for ``spin_us`` microseconds (yielding the core each turn: on a machine with more processes than
  cores the peer may be waiting for it; measured here, that halves the round trip under load), then sleeps on the
  rank's doorbell (see ``_shm_ring``), woken by the peer, by the peer's exit (a pidfd per peer: a killed peer is
  noticed at once, as a closed gloo socket is) or after ``PARK_MAX_S`` to check the deadline. An idle rank uses no
  CPU.
- ``all_reduce``, ``broadcast``, ``barrier`` and ``new_group`` run on the gloo process group made at :meth:`init`
  (kept as :attr:`ShmTransport.gloo`), which also carries the rendezvous.

Segments are named ``stagewise-shm-<port>-<src>-<dst>`` and unlinked by their creator (the receiver) as soon as both
ranks mapped them, so nothing stays in ``/dev/shm`` whatever kills the processes afterwards; a run killed during
set-up is swept by the launcher (:func:`remove_shm_segments`).
"""

from __future__ import annotations

import collections
import datetime
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from ._dist import DistTransport
from ._errors import CommError, CommTimeoutError
from ._expect import check_expect
from ._framing import HEADER_SLOTS, Value, as_bytes, prepare
from ._rendezvous import rendezvous_store
from ._shm_reader import BufferPool, Reader
from ._shm_ring import (
    PARK_MAX_S,
    Doorbell,
    Ring,
    check_supported,
    create_segment,
    fence,
    open_segment,
    remove_segments,
    unlink_segment,
)
from ._transport import CommGroup, ReduceOp, SendHandle, Transport

__all__ = ["DEFAULT_RING_BYTES", "DEFAULT_SPIN_US", "ShmTransport", "remove_shm_segments", "shm_prefix"]

DEFAULT_RING_BYTES = 4 * 1024 * 1024
"""Data bytes of each ring; larger messages are chunked through it."""
DEFAULT_SPIN_US = 100.0
"""How long a wait spins before it sleeps on the doorbell."""
_HEADER_BYTES = HEADER_SLOTS * 8
_MIN_RING_BYTES = 64 * 1024
T = TypeVar("T")


def shm_prefix(port: int) -> str:
    """The name prefix of every segment of the run whose rendezvous is on ``port``."""
    return f"stagewise-shm-{port}-"


def remove_shm_segments(port: int) -> list[str]:
    """Remove what a run on ``port`` left in ``/dev/shm`` (only a run killed while its ranks were attaching leaves
    anything); the names removed."""
    return remove_segments(shm_prefix(port))


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


class _Outgoing:
    """A message being written into a ring: its byte parts in order, and how far it got."""

    __slots__ = ("done", "index", "offset", "parts", "keepalive")

    def __init__(self, parts: list[np.ndarray], keepalive: list[torch.Tensor]) -> None:
        self.parts, self.keepalive = parts, keepalive
        self.index = self.offset = 0
        self.done = not parts


class _ShmSendHandle(SendHandle):
    def __init__(self, transport: ShmTransport, out: _Outgoing, *, dst: int, tag: int) -> None:
        self._t, self._out, self._dst, self._tag = transport, out, dst, tag

    def wait(self, timeout: float | None = None) -> None:
        if not self._out.done:
            self._t._wait_for(lambda: True if self._out.done else None, op="send", peer=self._dst, tag=self._tag,
                              timeout=timeout)


class ShmTransport(Transport):
    """A :class:`Transport` for ranks on one host: messages through shared-memory rings, collectives on gloo.

    Build with :meth:`init`. CPU tensors only (a CUDA run uses :class:`DistTransport`).
    """

    def __init__(self, *, gloo: DistTransport, prefix: str, inbound: dict[int, Ring], outbound: dict[int, Ring],
                 doorbell: Doorbell, pids: dict[int, int], spin_us: float) -> None:
        super().__init__(rank=gloo.rank, world_size=gloo.world_size, timeout=gloo.timeout)
        self.gloo = gloo
        """The gloo transport the collectives run on."""
        self.spin_s = spin_us / 1e6
        self._prefix, self._bell, self._pids = prefix, doorbell, pids
        self._out = outbound
        pool = BufferPool()
        self._readers = {src: Reader(ring, src=src, pool=pool) for src, ring in inbound.items()}
        self._outbox: dict[int, collections.deque[_Outgoing]] = {dst: collections.deque() for dst in outbound}
        self._stash: dict[tuple[int, int], collections.deque[list[Value]]] = collections.defaultdict(collections.deque)
        self._pidfds = {os.pidfd_open(pid): peer for peer, pid in pids.items()}
        self._dead: set[int] = set()
        self._poller = select.poll()
        self._poller.register(doorbell.fileno(), select.POLLIN)
        for fd in self._pidfds:
            self._poller.register(fd, select.POLLIN)
        for peer, ring in [*inbound.items(), *outbound.items()]:
            bell = f"{prefix}bell-{peer}"
            ring.wake_peer = lambda bell=bell: doorbell.ring(bell)
        self.world = gloo.world

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def init(cls, *, rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int,
             timeout: float = 30.0, ring_bytes: int = DEFAULT_RING_BYTES,
             spin_us: float = DEFAULT_SPIN_US) -> ShmTransport:
        """Start the gloo process group (rank 0 serves its store on ``master_addr:master_port``), then map a ring of
        ``ring_bytes`` per directed pair of ranks; every rank must be on this host."""
        check_supported()
        if not isinstance(ring_bytes, int) or ring_bytes < _MIN_RING_BYTES:
            raise ValueError(f"ring_bytes must be an int >= {_MIN_RING_BYTES}, got {ring_bytes!r}")
        if not spin_us >= 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        store = rendezvous_store(host=master_addr, port=master_port, rank=rank, world_size=world_size,
                                 timeout=timeout)
        gloo = DistTransport.init(rank=rank, world_size=world_size, timeout=timeout, store=store)
        prefix = shm_prefix(master_port)
        made: list[str] = []
        rings: list[Ring] = []
        bell = None
        try:
            wait = datetime.timedelta(seconds=timeout)
            others = [r for r in range(world_size) if r != rank]
            bell = Doorbell(f"{prefix}bell-{rank}")
            inbound = {}
            for src in others:  # the receiver makes the rings it reads
                name = f"{prefix}{src}-{rank}"
                made.append(name)
                inbound[src] = Ring(create_segment(name, ring_bytes), name=name)
                rings.append(inbound[src])
            store.set(f"stagewise_shm/ready/{rank}", f"{os.getpid()} {_host_id()}")
            store.wait([f"stagewise_shm/ready/{r}" for r in others], wait)
            pids = {}
            for r in others:
                pid, host = store.get(f"stagewise_shm/ready/{r}").decode().split(" ", 1)
                if host != _host_id():
                    raise ValueError(f"rank {r} runs on host {host}, rank {rank} on {_host_id()}: the shared-memory "
                                     "transport needs every rank on one host; use transport 'gloo'")
                pids[r] = int(pid)
            outbound = {}
            for dst in others:
                outbound[dst] = Ring(open_segment(f"{prefix}{rank}-{dst}"), name=f"{prefix}{rank}-{dst}")
                rings.append(outbound[dst])
            store.set(f"stagewise_shm/attached/{rank}", "1")
            store.wait([f"stagewise_shm/attached/{r}" for r in others], wait)
            for name in made:  # both ends mapped it: from now on nothing is left behind, however the ranks end
                unlink_segment(name)
            return cls(gloo=gloo, prefix=prefix, inbound=inbound, outbound=outbound, doorbell=bell, pids=pids,
                       spin_us=spin_us)
        except BaseException:
            for name in made:
                unlink_segment(name)
            for ring in rings:
                ring.close()
            if bell is not None:
                bell.close()
            gloo.close()
            raise

    # -- point to point ------------------------------------------------------------------------------------------
    def isend(self, values: Sequence[Value], *, dst: int, tag: int = 0) -> SendHandle:
        self._check_peer(dst, name="dst")
        self._check_tag(tag)
        p = prepare(values)
        for t in (*p.small, *p.large):
            if not t.is_cpu:
                raise ValueError(f"the shared-memory transport moves CPU tensors, got one on {t.device}; use "
                                 "transport 'gloo' (or auto) for CUDA runs")
        extension = p.extension()
        ext_bytes = 0 if extension is None else extension.numel() * 8
        first = _HEADER_BYTES + ext_bytes + p.pack_bytes
        ring, queue = self._out[dst], self._outbox[dst]
        parts: list[np.ndarray] = []
        pos = None if queue else ring.reserve(first)
        if pos is not None:  # the common case: header, descriptors and small tensors written in place, one commit
            p.write_header(ring.data[pos : pos + _HEADER_BYTES], src=self.rank, tag=tag)
            if extension is not None:
                ring.data[pos + _HEADER_BYTES : pos + _HEADER_BYTES + ext_bytes] = extension.numpy().view(np.uint8)
            if p.small:
                p.write_pack(ring.data_t, pos + _HEADER_BYTES + ext_bytes, ring.data)
            ring.commit(first)
        else:
            buf = np.empty(first, dtype=np.uint8)
            p.write_header(buf, src=self.rank, tag=tag)
            if extension is not None:
                buf[_HEADER_BYTES : _HEADER_BYTES + ext_bytes] = extension.numpy().view(np.uint8)
            if p.small:
                p.write_pack(torch.from_numpy(buf), _HEADER_BYTES + ext_bytes, buf)
            parts.append(buf)
        keepalive = [as_bytes(t) for t in p.large]  # views of the caller's memory when contiguous
        parts += [t.numpy() for t in keepalive]
        out = _Outgoing(parts, keepalive)
        if parts:
            queue.append(out)
            self._pump(dst)
        return _ShmSendHandle(self, out, dst=dst, tag=tag)

    def _pump(self, dst: int) -> None:
        """Write as much of the pending messages to ``dst`` as the ring has room for, in order."""
        ring, queue = self._out[dst], self._outbox[dst]
        while queue:
            out = queue[0]
            while out.index < len(out.parts):
                part = out.parts[out.index]
                out.offset += ring.write(part, out.offset)
                if out.offset < len(part):
                    return
                out.index, out.offset = out.index + 1, 0
            out.done, out.parts, out.keepalive = True, [], []
            queue.popleft()

    def recv(self, *, src: int, tag: int = 0, timeout: float | None = None,
             expect: Sequence[Any] | None = None) -> list[Value]:
        self._check_peer(src, name="src")
        self._check_tag(tag)
        values = self._take(src, tag)
        if values is None:
            values = self._wait_for(lambda: self._take(src, tag), op="recv", peer=src, tag=tag, timeout=timeout)
        check_expect(values, expect, where=f"recv on rank {self.rank} from rank {src} (tag {tag})")
        return values

    def _take(self, src: int, tag: int) -> list[Value] | None:
        """The next message from ``src`` on ``tag`` if it has arrived; messages for other tags met on the way are
        kept for their own ``recv``."""
        kept = self._stash.get((src, tag))
        if kept:
            return kept.popleft()
        reader = self._readers[src]
        while True:
            got = reader.poll()
            if got is None:
                return None
            if got[0] == tag:
                return got[1]
            self._stash[(src, got[0])].append(got[1])

    def _progress(self) -> None:
        """Advance every pending send and take every message that has arrived (kept for its ``recv``): a rank that
        waits for one thing never holds up a peer that waits for another."""
        for dst, queue in self._outbox.items():
            if queue:
                self._pump(dst)
        for src, reader in self._readers.items():
            while (got := reader.poll()) is not None:
                self._stash[(src, got[0])].append(got[1])

    # -- waiting -------------------------------------------------------------------------------------------------
    def _wait_for(self, ready: Callable[[], T | None], *, op: str, peer: int, tag: int, timeout: float | None) -> T:
        """Advance pending sends and call ``ready`` until it returns a result: spin ``spin_s``, then sleep on the
        doorbell. Raises :class:`CommTimeoutError` at the deadline and :class:`CommError` when ``peer`` exited."""
        waited, deadline = self._deadline(timeout)
        spin_until = time.monotonic() + self.spin_s
        while True:
            self._progress()
            got = ready()
            if got is not None:
                return got
            now = time.monotonic()
            if now >= deadline:
                raise CommTimeoutError(op=op, rank=self.rank, peer=peer, tag=tag, waited=waited)
            if peer in self._dead:
                self._peer_gone(op, peer, tag)
            if now < spin_until:
                os.sched_yield()  # on a busy machine the peer may be waiting for this core
                continue
            got = self._park(ready, until=min(deadline, now + PARK_MAX_S))
            if got is not None:
                return got

    def _park(self, ready: Callable[[], T | None], *, until: float) -> T | None:
        rings = [(ring, False) for dst, ring in self._out.items() if self._outbox[dst]]
        rings += [(reader.ring, True) for reader in self._readers.values()]
        for ring, consumer in rings:
            ring.park(consumer=consumer, on=True)
        try:
            fence()
            self._progress()
            got = ready()
            if got is not None:
                return got
            events = self._poller.poll(max(until - time.monotonic(), 0.0) * 1000)
        finally:
            for ring, consumer in rings:
                ring.park(consumer=consumer, on=False)
        for fd, _ in events:
            if fd in self._pidfds:  # a peer exited: stop watching it (its fd stays readable)
                self._dead.add(self._pidfds[fd])
                self._poller.unregister(fd)
            else:
                self._bell.drain()
        return None

    def _peer_gone(self, op: str, peer: int, tag: int) -> None:
        direction = "to" if op == "send" else "from"
        raise CommError(f"rank {self.rank}: {op} {direction} rank {peer} (tag {tag}) failed: rank {peer} (pid "
                        f"{self._pids[peer]}) exited; the peer process probably crashed or was killed, check its log")

    # -- collectives: on the gloo group --------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, *, group: CommGroup | None = None, op: ReduceOp = "sum",
                   timeout: float | None = None) -> None:
        self._check_open()
        self.gloo.all_reduce(tensor, group=group, op=op, timeout=timeout)

    def broadcast(self, tensor: torch.Tensor, *, src: int, group: CommGroup | None = None,
                  timeout: float | None = None) -> None:
        self._check_open()
        self.gloo.broadcast(tensor, src=src, group=group, timeout=timeout)

    def new_group(self, ranks: Sequence[int]) -> CommGroup:
        self._check_open()
        return self.gloo.new_group(ranks)

    def barrier(self, timeout: float | None = None) -> None:
        self._check_open()
        self.gloo.barrier(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.gloo.close()
        finally:
            for fd in self._pidfds:
                os.close(fd)
            self._bell.close()
            for reader in self._readers.values():
                reader.ring.close()
            for ring in self._out.values():
                ring.close()
            self._readers, self._out, self._outbox = {}, {}, {}
