"""Shared-memory rings between ranks on one host: a preallocated segment per directed pair of ranks holding a
single-producer single-consumer byte stream, and the doorbell a parked rank sleeps on.

Layout of one segment (a file ``/dev/shm/<prefix>-<src>-<dst>``, unlinked once both ranks mapped it)::

    bytes   0..7     head        int64, total bytes ever written (the producer's only store)
    bytes  64..71    tail        int64, total bytes ever read (the consumer's only store)
    bytes 128..135   rx_parked   1 while the consumer sleeps on its doorbell
    bytes 192..199   tx_parked   1 while the producer sleeps on its doorbell (ring full)
    bytes 256..      data        ``capacity`` bytes, written and read at ``index % capacity``

Why no lock is needed: one producer, one consumer, and each index has one writer that stores it with one aligned
8-byte store after the bytes it publishes (producer) or after it has read the bytes it frees (consumer). x86-64 keeps
stores in order and loads in order (TSO), so a side that sees an index also sees those bytes. Other architectures
need fences that Python cannot issue, so :func:`check_supported` refuses them.

Parking (the "store the flag, fence, check again" handshake): a waiter stores its parked flag, fences, checks its
condition once more, then sleeps in ``poll``; a waker stores its index, fences, and rings the doorbell only when the
flag is set. With the fences one of the two always sees the other's store. The fence is an uncontended lock
acquire/release (a locked instruction on x86-64). Sleeps are also capped (``PARK_MAX_S``), so even a lost wake-up
costs milliseconds, not a hang.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import socket
import threading
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "PARK_MAX_S",
    "SHM_DIR",
    "Doorbell",
    "Ring",
    "check_supported",
    "create_segment",
    "fence",
    "open_segment",
    "remove_segments",
    "unlink_segment",
]

SHM_DIR = "/dev/shm"
PARK_MAX_S = 0.05
"""Longest single sleep of a parked rank: it then re-checks its condition, its peers and its deadline."""
_DATA = 256
_HEAD, _TAIL, _RX_PARKED, _TX_PARKED = 0, 8, 16, 24  # int64 slots, one cache line apart
_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier between a store and a later load (an uncontended lock is a locked instruction)."""
    _FENCE.acquire()
    _FENCE.release()


def check_supported() -> None:
    """Raise ``ValueError`` naming what to change when shared-memory rings cannot work on this machine."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise ValueError(f"the shared-memory transport relies on x86-64 memory ordering; this machine is "
                         f"{platform.machine()}: use transport 'gloo'")
    if not os.path.isdir(SHM_DIR):
        raise ValueError(f"the shared-memory transport needs {SHM_DIR} (POSIX shared memory); use transport 'gloo'")
    if not hasattr(os, "pidfd_open"):
        raise ValueError("the shared-memory transport watches peers with pidfd_open (Linux >= 5.3); use "
                         "transport 'gloo'")


def _path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def create_segment(name: str, capacity: int) -> mmap.mmap:
    """Create (replacing a stale one of the same name) and map a segment with ``capacity`` data bytes."""
    unlink_segment(name)  # names carry the run's port: a file with this name is left from a dead run
    fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, _DATA + capacity)
        return mmap.mmap(fd, _DATA + capacity)
    finally:
        os.close(fd)


def open_segment(name: str) -> mmap.mmap:
    """Map an existing segment made by :func:`create_segment`."""
    fd = os.open(_path(name), os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    """Remove a segment's name (mappings stay valid until unmapped); a missing name is fine."""
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def remove_segments(prefix: str) -> list[str]:
    """Remove every segment whose name starts with ``prefix`` (what a run killed during set-up left); their names."""
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    for name in names:
        unlink_segment(name)
    return names


class Ring:
    """One side's view of a segment: the producer calls :meth:`write`, the consumer :meth:`read_into`,
    :meth:`contiguous` and :meth:`advance`. Each side keeps its own index locally and only reads the other's."""

    def __init__(self, mm: mmap.mmap, *, name: str) -> None:
        self.mm, self.name = mm, name
        self.capacity = len(mm) - _DATA
        self.ctl = np.ndarray((_DATA // 8,), dtype=np.int64, buffer=mm)
        self.data = np.ndarray((self.capacity,), dtype=np.uint8, buffer=mm, offset=_DATA)
        self.data_t = torch.from_numpy(self.data)
        self.head = int(self.ctl[_HEAD])
        self.tail = int(self.ctl[_TAIL])
        self.wake_peer: Callable[[], None] = lambda: None
        """Called after a store the other side may be parked on (it rings the peer's doorbell); set by the
        transport."""

    # -- producer --------------------------------------------------------------------------------------------------
    def free(self) -> int:
        return self.capacity - (self.head - int(self.ctl[_TAIL]))

    def reserve(self, n: int) -> int | None:
        """Offset in :attr:`data` where ``n`` bytes can be written in one piece now (then :meth:`commit`), or None."""
        pos = self.head % self.capacity
        return pos if pos + n <= self.capacity and self.free() >= n else None

    def commit(self, n: int) -> None:
        """Publish ``n`` bytes written at the head; wake the consumer if it sleeps."""
        self.head += n
        self.ctl[_HEAD] = self.head
        fence()
        if self.ctl[_RX_PARKED]:
            self.wake_peer()

    def write(self, src: np.ndarray, start: int) -> int:
        """Write as much of ``src[start:]`` (flat uint8) as fits, wrapping around; publish it; bytes written."""
        n = min(len(src) - start, self.free())
        if n <= 0:
            return 0
        pos = self.head % self.capacity
        first = min(n, self.capacity - pos)
        self.data[pos : pos + first] = src[start : start + first]
        if first < n:
            self.data[: n - first] = src[start + first : start + n]
        self.commit(n)
        return n

    # -- consumer --------------------------------------------------------------------------------------------------
    def available(self) -> int:
        return int(self.ctl[_HEAD]) - self.tail

    def contiguous(self, n: int) -> int | None:
        """Offset in :attr:`data` of the next ``n`` bytes when they have all arrived in one piece, else None."""
        pos = self.tail % self.capacity
        return pos if pos + n <= self.capacity and self.available() >= n else None

    def advance(self, n: int) -> None:
        """Free ``n`` bytes read in place; wake the producer if it sleeps on a full ring."""
        self.tail += n
        self.ctl[_TAIL] = self.tail
        fence()
        if self.ctl[_TX_PARKED]:
            self.wake_peer()

    def read_into(self, dst: np.ndarray, start: int) -> int:
        """Copy as many of the next bytes as have arrived into ``dst[start:]`` (flat uint8); bytes copied."""
        n = min(len(dst) - start, self.available())
        if n <= 0:
            return 0
        pos = self.tail % self.capacity
        first = min(n, self.capacity - pos)
        dst[start : start + first] = self.data[pos : pos + first]
        if first < n:
            dst[start + first : start + n] = self.data[: n - first]
        self.advance(n)
        return n

    # -- parking ---------------------------------------------------------------------------------------------------
    def park(self, *, consumer: bool, on: bool) -> None:
        self.ctl[_RX_PARKED if consumer else _TX_PARKED] = int(on)

    def close(self) -> None:
        """Unmap (views are dropped first; a view still held elsewhere leaves the mapping to the garbage collector)."""
        self.ctl = self.data = self.data_t = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            pass


class Doorbell:
    """What a parked rank sleeps on: a datagram socket in Linux's abstract namespace (no file, gone with the process).
    Anyone rings it with :meth:`ring`; a full queue means a wake-up is already pending."""

    def __init__(self, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind("\0" + name)
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def ring(self, name: str) -> None:
        """Wake the rank whose doorbell is ``name``."""
        try:
            self._out.sendto(b"\1", "\0" + name)
        except OSError as exc:  # full (a wake-up is pending) or gone (the peer exited: its waiters notice)
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOENT):
                raise

    def drain(self) -> None:
        try:
            while True:
                self.sock.recv(64)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()
        self._out.close()
