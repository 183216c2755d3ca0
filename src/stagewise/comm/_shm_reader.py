"""The receiving side of a shared-memory ring: turns the byte stream back into messages, as far as bytes have arrived.

A message in the stream is what ``_framing`` describes: the header, the descriptor extension if any, the pack of small
tensors, then every large tensor's bytes. :meth:`Reader.poll` reads as much as has arrived and keeps its place, so a
message larger than the ring is taken in chunks while the sender writes the rest. Each tensor's bytes are copied once,
from the ring into the tensor returned: large tensors get their own buffer filled chunk by chunk; small ones are copied
out of the pack, read in place in the ring when it arrived in one piece and no large tensor follows (the typical
activation message), else gathered first.

Large tensors land in recycled buffers (:class:`BufferPool`): a fresh 64 MiB allocation costs more in page faults
than the copy itself, and a pipeline receives the same shapes every microbatch. A buffer is reused only once nothing
refers to it any more (no tensor, view or autograd graph holds its storage).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ._framing import (
    HEADER_SLOTS,
    HEADER_STRUCT,
    Desc,
    Value,
    buffer_layout,
    materialise_from,
    parse_descriptors,
    parse_header,
)
from ._shm_ring import Ring

__all__ = ["BufferPool", "Reader"]

_HEADER_BYTES = HEADER_SLOTS * 8
_CPU = torch.device("cpu")
_KNOWN = 64  # descriptor layouts a reader remembers


class BufferPool:
    """Byte buffers for received tensors, kept warm (already faulted in) for the next message of the same size.

    A tensor made with ``torch.from_numpy(buffer)`` holds a reference to the buffer for as long as its storage lives,
    so a buffer that only this pool refers to is free: its reference count says so.
    """

    def __init__(self, *, keep: int = 8) -> None:
        self.keep = keep
        self._buffers: list[np.ndarray] = []

    def tensor(self, n: int) -> torch.Tensor:
        """A uint8 tensor of ``n`` bytes (contents undefined) that owns its storage until dropped."""
        free = None
        for i in range(len(self._buffers)):
            if sys.getrefcount(self._buffers[i]) == 2:  # the list's reference and the call's: nobody else's
                if self._buffers[i].size == n:
                    buf = self._buffers.pop(i)
                    self._buffers.append(buf)  # most recently used last
                    return torch.from_numpy(buf)
                if free is None:
                    free = i
        buf = np.empty(n, dtype=np.uint8)
        if len(self._buffers) >= self.keep and free is not None:
            del self._buffers[free]  # the least recently used free buffer makes room
        if len(self._buffers) < self.keep:
            self._buffers.append(buf)
        return torch.from_numpy(buf)


class Reader:
    """Messages from rank ``src`` out of ``ring``, one :meth:`poll` at a time."""

    def __init__(self, ring: Ring, *, src: int, pool: BufferPool) -> None:
        self.ring, self.src, self.pool = ring, src, pool
        self._header_buf = np.empty(_HEADER_BYTES, dtype=np.uint8)
        self._known: dict[tuple[int, ...], tuple[list[Desc], list[int], list[tuple[int, int, int] | None], int]] = {}
        self._start()

    def _start(self) -> None:
        self._header: tuple[int, ...] | None = None
        self._extension: np.ndarray | None = None
        self._descs: list[Desc] | None = None
        self._targets: list[np.ndarray] = []  # byte buffers still to fill, in stream order
        self._index = self._offset = 0
        self._pack: torch.Tensor | None = None
        self._large: list[torch.Tensor] = []
        self._in_place = False

    def poll(self) -> tuple[int, list[Value]] | None:
        """``(tag, values)`` of the next message once all of it has arrived, else None (call again later)."""
        ring = self.ring
        if self._header is None:
            if ring.available() < _HEADER_BYTES:
                return None
            pos = ring.contiguous(_HEADER_BYTES)
            if pos is not None:
                header = HEADER_STRUCT.unpack_from(ring.data, pos)
                ring.advance(_HEADER_BYTES)
            else:
                ring.read_into(self._header_buf, 0)
                header = HEADER_STRUCT.unpack_from(self._header_buf)
            _, ext_len = parse_header(header, src=self.src, tag=header[3])
            self._header = header
            if ext_len:
                self._extension = np.empty(ext_len * 8, dtype=np.uint8)
                self._targets.append(self._extension)
        if not self._fill():
            return None
        if self._descs is None:
            self._describe()
            self._layout()
            if not self._fill():
                return None
        if self._in_place and not self._read_pack_in_place():
            return None
        tag = self._header[3]
        values = materialise_from(self._descs, self._where, pack=self._pack, large=self._large, device=_CPU)
        if self._in_place:
            ring.advance(self._pack_bytes)
        self._start()
        return tag, values

    def _describe(self) -> None:
        """Decode the descriptors and the buffer layout; a pipeline sends the same descriptors message after message,
        so those read from the header alone are remembered by their slots."""
        assert self._header is not None
        if self._extension is not None:
            self._descs = parse_descriptors(self._header, self._extension.view(np.int64).tolist())
            self._sizes, self._where, self._pack_bytes = buffer_layout(self._descs)
            return
        key = self._header[4 : 6 + self._header[5]]
        known = self._known.get(key)
        if known is None:
            descs = parse_descriptors(self._header, None)
            known = (descs, *buffer_layout(descs))
            if len(self._known) >= _KNOWN:
                self._known.clear()
            self._known[key] = known
        self._descs, self._sizes, self._where, self._pack_bytes = known

    def _layout(self) -> None:
        """Allocate the buffers the message's bytes land in, from its descriptors."""
        sizes = self._sizes
        large_sizes = sizes[1:] if self._pack_bytes else sizes
        if self._pack_bytes:
            self._in_place = not large_sizes
            if not self._in_place:
                self._pack = torch.empty(self._pack_bytes, dtype=torch.uint8)
                self._targets.append(self._pack.numpy())
        for n in large_sizes:
            t = self.pool.tensor(n)
            self._large.append(t)
            self._targets.append(t.numpy())

    def _read_pack_in_place(self) -> bool:
        """Point :attr:`_pack` at the pack inside the ring once it has arrived (it is advanced past after use); when
        it wraps around the ring's end, gather it into a buffer instead. False: not all here yet."""
        ring, n = self.ring, self._pack_bytes
        if ring.tail % ring.capacity + n > ring.capacity:
            self._in_place = False
            self._pack = torch.empty(n, dtype=torch.uint8)
            self._targets.append(self._pack.numpy())
            return self._fill()
        pos = ring.contiguous(n)
        if pos is None:
            return False
        self._pack = ring.data_t[pos : pos + n]
        return True

    def _fill(self) -> bool:
        """Copy arrived bytes into the pending buffers in order; True once all are full."""
        while self._index < len(self._targets):
            target = self._targets[self._index]
            self._offset += self.ring.read_into(target, self._offset)
            if self._offset < len(target):
                return False
            self._index, self._offset = self._index + 1, 0
        return True
