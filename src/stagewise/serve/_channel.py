"""The gateway <-> stage-worker channel: one local TCP connection per worker, framed without pickle.

A frame is, in wire order::

    !IQ prefix   header length (bytes), data length (bytes)
    header       UTF-8 JSON object: "kind" plus message fields, and "tensors": [{name, dtype, shape, offset, nbytes}]
    data         raw tensor bytes (native byte order); each tensor starts at a 64-byte aligned offset

The gateway listens and the workers connect, so the gateway's end survives any worker's death: a dead worker is an EOF
on its connection, never a hang. Message kinds (see ``_worker`` and ``_pipeline``):

    gateway -> worker   challenge {nonce} (on accept; see ``_listener``), load {id, version, checkpoint},
                        discard {id} (weights versions: see ``_live_update``)
    worker -> gateway   hello {replica, generation, stage, pid, mac}, ready {stage, digest, version}, fatal {message},
                        beat {} (every heartbeat interval, from a thread of its own),
                        result {seq, times, version, +output tensors} (last stage), error {seq, stage, error, message},
                        loaded {id, stage, seconds}, load_failed {id, stage, message}
    gateway -> stage 0  run {seq, rows, +every model input} (later stages get theirs from the stage before),
                        switch {id} (run weights version ``id`` from the next batch on)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any, NoReturn

import torch

from .._errors import StagewiseError

__all__ = ["DTYPES", "PREFIX", "Channel", "ChannelError", "Message", "encode_frame", "parse_header", "report_fatal",
           "start_heartbeat"]

PREFIX = struct.Struct("!IQ")
"""Frame prefix: header length, data length (bytes)."""
_ALIGN = 64
MAX_HEADER_BYTES = 1 << 20
"""Largest JSON header accepted (1 MiB): anything larger is a corrupt or foreign stream."""
MAX_DATA_BYTES = 1 << 36
"""Largest tensor payload accepted (64 GiB)."""

DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
               torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
               torch.complex128)
}
"""Tensor dtypes the channel carries, by name (``float32``...)."""


class ChannelError(StagewiseError, ConnectionError):
    """The peer sent something that is not a valid frame, or the connection broke inside a frame."""


@dataclasses.dataclass
class Message:
    """One received frame."""

    header: dict[str, Any]
    """The JSON header without its ``tensors`` entry."""
    tensors: dict[str, torch.Tensor]
    """Tensors by name, in sent order; they share one receive buffer."""

    @property
    def kind(self) -> str:
        return str(self.header.get("kind", ""))


def _raw(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def encode_frame(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """One frame as bytes: prefix, JSON header (with the tensor table) and aligned tensor bytes."""
    table: list[dict[str, Any]] = []
    blobs: list[memoryview | bytes] = []
    offset = 0
    for name, t in (tensors or {}).items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which the serving channel does not carry")
        raw = _raw(t)
        pad = -offset % _ALIGN
        if pad:
            blobs.append(bytes(pad))
            offset += pad
        table.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": raw.nbytes})
        blobs.append(raw)
        offset += raw.nbytes
    doc = dict(header)
    doc["tensors"] = table
    head = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([PREFIX.pack(len(head), offset), head, *blobs])


def _no_constant(name: str) -> Any:
    raise ChannelError(f"frame header holds {name}, which no stagewise peer sends")


def parse_header(raw: bytes | bytearray) -> dict[str, Any]:
    """A frame's JSON header as a dict; ``ChannelError`` for anything else (NaN/Infinity included: a forged
    ``"replica": Infinity`` must not reach an ``int()``)."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ChannelError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ChannelError("frame header must be a JSON object")
    return header


def _decode_tensors(table: Any, data: bytearray) -> dict[str, torch.Tensor]:
    if not isinstance(table, list):
        raise ChannelError("frame header 'tensors' must be a list")
    out: dict[str, torch.Tensor] = {}
    for entry in table:
        try:
            name, dtype, shape = str(entry["name"]), DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]]
            offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ChannelError(f"bad tensor entry {entry!r} in frame header: {exc}") from None
        numel = 1
        for d in shape:
            numel *= d
        if min(shape, default=0) < 0 or offset < 0 or nbytes != numel * dtype.itemsize or offset + nbytes > len(data):
            raise ChannelError(f"tensor {name!r}: shape {shape} {dtype} does not fit {nbytes} bytes at {offset} of a "
                               f"{len(data)}-byte payload")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(data, dtype=dtype, count=numel, offset=offset).reshape(shape)
    return out


class Channel:
    """A framed, thread-safe-for-sending connection. ``recv`` belongs to one reader thread.

    ``send`` never blocks its caller on a slow reader (the gateway sends from its event loop): it writes what the
    socket takes at once (``MSG_DONTWAIT``) and leaves the rest, in order, to a flusher thread started on first need.
    """

    def __init__(self, sock: socket.socket, *, send_timeout_s: float = 30.0) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._closed = False
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._flushing = threading.Condition(self._send_lock)
        self._flusher: threading.Thread | None = None
        self.send_error: OSError | None = None
        """Why a backlogged send failed (the connection is then closed)."""
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
        # A send that cannot make progress for this long fails instead of blocking its caller forever (a stuck peer).
        secs = int(send_timeout_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", secs, int((send_timeout_s - secs) * 1e6)))

    def send(self, header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Send one frame without blocking on the peer; raises ``OSError`` when the connection is gone."""
        frame = memoryview(encode_frame(header, tensors))
        with self._send_lock:
            if self._closed:
                raise ConnectionError("channel is closed" if self.send_error is None else
                                      f"channel is closed: {self.send_error}")
            if not self._backlog:
                try:
                    sent = self.sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                frame = frame[sent:]
                if not frame:
                    return
            self._backlog.append(frame)
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush, name="stagewise-channel-flush", daemon=True)
                self._flusher.start()
            self._flushing.notify()

    def _flush(self) -> None:
        """Flusher thread: writes the backlog in order with blocking sends (bounded by the send timeout)."""
        while True:
            with self._send_lock:
                while not self._backlog and not self._closed:
                    self._flushing.wait()
                if self._closed:
                    return
                chunk = self._backlog[0]
            try:
                self.sock.sendall(chunk)  # outside the lock: senders keep appending meanwhile
            except OSError as exc:
                with self._send_lock:
                    self.send_error = exc
                    self._backlog.clear()
                self.close()
                return
            with self._send_lock:
                self._backlog.popleft()

    def _read_exact(self, n: int, *, at_start: bool = False) -> bytearray | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                if at_start and got == 0:
                    return None
                raise ChannelError(f"connection closed inside a frame ({got} of {n} bytes read)")
            got += k
        return buf

    def recv(self, *, max_data_bytes: int = MAX_DATA_BYTES) -> Message | None:
        """The next frame, or None on a clean EOF between frames. Raises ``ChannelError`` / ``OSError``.

        ``max_data_bytes`` bounds what an unauthenticated peer can make this side allocate (0 for a hello).
        """
        prefix = self._read_exact(PREFIX.size, at_start=True)
        if prefix is None:
            return None
        head_len, data_len = PREFIX.unpack(prefix)
        if head_len > MAX_HEADER_BYTES or data_len > max_data_bytes:
            raise ChannelError(f"frame sizes {head_len}/{data_len} bytes exceed the limits: not a stagewise peer?")
        head = self._read_exact(head_len)
        assert head is not None
        header = parse_header(head)
        data = self._read_exact(data_len) if data_len else bytearray()
        assert data is not None
        tensors = _decode_tensors(header.pop("tensors", []), data)
        return Message(header, tensors)

    def close(self) -> None:
        """Shut the connection down (wakes a reader blocked in ``recv``); idempotent."""
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            self._flushing.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # also wakes a flusher stuck in sendall
        except OSError:
            pass
        self.sock.close()


def start_heartbeat(chan: Channel, every_s: float) -> None:
    """A worker's heartbeat: a thread of its own sends ``beat`` every ``every_s`` until the channel closes (a long
    forward on the main thread still beats; a stopped process does not)."""

    def beat() -> None:
        while True:
            time.sleep(every_s)
            try:
                chan.send({"kind": "beat"})
            except OSError:
                return

    threading.Thread(target=beat, name="stagewise-heartbeat", daemon=True).start()


def report_fatal(chan: Channel, who: str) -> NoReturn:
    """In a worker's ``except`` block: print the traceback (prefixed with ``who``), tell the gateway (``fatal``,
    when the channel still takes it) and end the process at once."""
    text = traceback.format_exc()
    sys.stderr.write(f"[{who}] {text}")
    sys.stderr.flush()
    try:
        chan.send({"kind": "fatal", "message": text[-4000:]})
    except OSError:
        pass
    os._exit(1)
