"""Writing a safetensors file while hashing it: straight from each tensor's memory, no ``bytes`` copy, fsynced.

``safetensors.torch.save_file`` builds the whole file as one ``bytes`` object first; here the header is built by
``_format.safetensors_header`` and each tensor's bytes go to the file chunk by chunk while a second thread computes
the file's sha256 from the same buffers. With direct I/O (Linux, where the file system accepts it) the chunks are
copied once into page-aligned buffers and the disk reads them from there: no copy into the page cache, and no pile of
dirty pages for the closing fsync to wait for.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._format import chunks, raw_bytes, safetensors_header

try:
    import fcntl
except ImportError:  # not a POSIX system: no direct I/O
    fcntl = None  # type: ignore[assignment]

__all__ = ["write_safetensors"]

log = logging.getLogger(__name__)

CHUNK = 8 << 20
"""Bytes per write/hash call (and per direct-I/O buffer)."""
WRITEBACK_EVERY = 16 << 20
"""Buffered writes: ask the kernel to start writing dirty pages every this many bytes, so the fsync has little left."""
ALIGN = 4096
"""Direct I/O needs buffers, offsets and lengths aligned to the device's logical block: 4096 covers 512 too."""
DIRECT_IO = hasattr(os, "O_DIRECT") and fcntl is not None
"""Write tensor files with O_DIRECT when the file system accepts it; otherwise through the page cache."""


def _writeback_starter() -> Any:
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)`` from libc, or None where there is none (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _writeback_starter()


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], *,
                      metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write ``tensors`` as a safetensors file at ``path``, fsync it, and return ``{"sha256": hex, "size": bytes}``.

    Bytes are hashed while they are written (two threads), with direct I/O where the file system allows it (no copy
    into the page cache, no dirty pages for the final fsync to wait for), else through the page cache.
    """
    header, order = safetensors_header(tensors, metadata or {"format": "pt"})
    views = [memoryview(header), *(raw_bytes(tensors[name]) for name in order)]
    if DIRECT_IO:
        try:
            return _write_direct(path, views)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            log.debug("%s: no direct I/O on this file system (%s); writing through the page cache", path, exc)
    return _write_buffered(path, views)


def _write_direct(path: Path, views: list[memoryview]) -> dict[str, Any]:
    """O_DIRECT: the main thread copies into two page-aligned buffers in turn; one thread hashes, another writes.

    Only the last ``size % ALIGN`` bytes, which direct I/O cannot write, go through the page cache.
    """
    bufs = [mmap.mmap(-1, CHUNK) for _ in range(2)]  # anonymous mmaps are page-aligned, as O_DIRECT needs
    whole = [memoryview(b) for b in bufs]
    pending: list[tuple[concurrent.futures.Future[Any], ...]] = [(), ()]
    h = hashlib.sha256()
    size = fill = cur = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") as hasher, \
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-write") as writer:

            def emit(n: int) -> None:
                chunk = whole[cur][:n]
                pending[cur] = (hasher.submit(h.update, chunk), writer.submit(_write_all, fd, chunk))

            def wait(i: int) -> None:
                for f in pending[i]:
                    f.result()
                pending[i] = ()

            for v in views:
                off = 0
                while off < len(v):
                    if fill == 0:
                        wait(cur)  # this buffer's previous chunk is hashed and written: reuse it
                    take = min(CHUNK - fill, len(v) - off)
                    whole[cur][fill:fill + take] = v[off:off + take]
                    fill += take
                    off += take
                    if fill == CHUNK:
                        emit(CHUNK)
                        size += CHUNK
                        fill = 0
                        cur ^= 1
            wait(cur ^ 1)
            wait(cur)
            aligned = fill - fill % ALIGN
            if aligned:
                emit(aligned)
                wait(cur)
            tail = bytes(whole[cur][aligned:fill])
            size += fill
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        h.update(tail)
        _write_all(fd, memoryview(tail))
        os.fsync(fd)
    finally:
        os.close(fd)
        for mv in whole:
            mv.release()
        for b in bufs:
            try:
                b.close()
            except BufferError:  # a slice still referenced somewhere: the garbage collector unmaps it
                pass
    return {"sha256": h.hexdigest(), "size": size}


def _write_buffered(path: Path, views: list[memoryview]) -> dict[str, Any]:
    """Through the page cache: write each chunk while a helper thread hashes it, and ask the kernel to start
    writeback as the file grows so that the closing fsync waits for little."""
    h = hashlib.sha256()
    size = 0
    synced = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") as pool:
            pending: concurrent.futures.Future[None] | None = None
            for chunk in chunks(views, CHUNK):
                hashing = pool.submit(h.update, chunk)
                if pending is not None:
                    pending.result()
                pending = hashing
                _write_all(fd, chunk)
                size += len(chunk)
                if _SYNC_FILE_RANGE is not None and size - synced >= WRITEBACK_EVERY:
                    _SYNC_FILE_RANGE(fd, synced, size - synced, 2)  # 2 = SYNC_FILE_RANGE_WRITE: start, don't wait
                    synced = size
            if pending is not None:
                pending.result()
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"sha256": h.hexdigest(), "size": size}


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]
