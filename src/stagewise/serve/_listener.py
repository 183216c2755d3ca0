"""The gateway's end of the worker channel: one thread accepts worker connections and authenticates each before
anything is spent on it.

Any local process can connect to the channel port, so a connection costs nothing but a socket and a small buffer until
it proves that it holds the secret: no thread per connection, no allocation sized by what the peer says. Handshake::

    gateway -> worker   challenge {nonce}                          sent at once on accept
    worker  -> gateway  hello {replica, generation, stage, pid, mac}
                        mac = HMAC-SHA256(secret, "nonce:replica:generation:stage:pid"), hex

The secret never travels (a peer on the path learns nothing reusable), and a fresh nonce per connection makes a
recorded hello worthless. Only a verified hello hands the socket on (``on_hello``, which gives it a reader thread).

Bounds: at most ``max_pending`` connections are unauthenticated at once (a new one evicts the oldest), each must finish
its hello within ``hello_timeout_s`` and in at most :data:`MAX_HELLO_BYTES`; every hello field is type-checked (an
integer is an integer: ``"replica": Infinity`` or ``1e308`` is refused, not converted).

The accept loop survives everything but :meth:`ChannelListener.close`: running out of file descriptors
(EMFILE/ENFILE), a connection reset before accept (ECONNABORTED), memory pressure (ENOBUFS/ENOMEM) are logged and
retried after a short back-off (the pending connection stays in the backlog meanwhile). If it ever ended, no worker
could rejoin: :attr:`ChannelListener.alive` is part of the backend's readiness.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ._channel import PREFIX, Channel, ChannelError, encode_frame, parse_header

__all__ = ["MAX_HELLO_BYTES", "ChannelListener", "HelloFields", "client_handshake", "peer_address"]

log = logging.getLogger(__name__)

MAX_HELLO_BYTES = 4096
"""Largest hello header an unauthenticated peer may send."""
_FIELDS = ("replica", "generation", "stage", "pid")
_MAX_FIELD = 1 << 62
_BACKOFF_S = (0.05, 1.0)


@dataclasses.dataclass(frozen=True, slots=True)
class HelloFields:
    """Who an authenticated worker says it is (each a non-negative int, checked before the MAC)."""

    replica: int
    generation: int
    stage: int
    pid: int


def _mac(secret: str, nonce: str, fields: HelloFields) -> str:
    text = ":".join([nonce, *(str(getattr(fields, f)) for f in _FIELDS)])
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def _fields(header: dict[str, Any]) -> HelloFields:
    values = {}
    for name in _FIELDS:
        v = header.get(name)
        if type(v) is not int or not 0 <= v < _MAX_FIELD:  # bool, float, huge: refused, never converted
            raise ChannelError(f"hello field {name!r} must be a non-negative integer, got {v!r}"[:200])
        values[name] = v
    return HelloFields(**values)


def peer_address(sock: socket.socket) -> str:
    """``host:port`` of the socket's peer (``?`` once it is gone)."""
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def client_handshake(chan: Channel, secret: str, fields: HelloFields, *, timeout_s: float) -> None:
    """Worker side: read the challenge, answer with an authenticated hello (raises ``OSError`` on failure)."""
    chan.sock.settimeout(timeout_s)
    msg = chan.recv(max_data_bytes=0)
    nonce = msg.header.get("nonce") if msg is not None and msg.kind == "challenge" else None
    if not isinstance(nonce, str) or not nonce:
        raise ChannelError("the gateway did not send a challenge: not a stagewise gateway?")
    chan.sock.settimeout(None)
    chan.send({"kind": "hello", **dataclasses.asdict(fields), "mac": _mac(secret, nonce, fields)})


@dataclasses.dataclass(eq=False)
class _Pending:
    sock: socket.socket
    nonce: str
    deadline: float
    buf: bytearray = dataclasses.field(default_factory=bytearray)
    need: int = PREFIX.size


class ChannelListener:
    """Listens on ``host`` (``port``, or a free one), authenticates workers, and calls ``on_hello(sock, fields)`` for
    each.

    ``on_hello`` runs on the listener thread and owns the (blocking) socket from then on; it must return quickly.
    """

    def __init__(self, host: str, secret: str, on_hello: Callable[[socket.socket, HelloFields], None], *,
                 port: int = 0, max_pending: int = 64, hello_timeout_s: float = 5.0) -> None:
        self._secret, self._on_hello = secret, on_hello
        self._max_pending, self._hello_timeout_s = max_pending, hello_timeout_s
        self._sock = socket.create_server((host, port), backlog=128)
        self._sock.setblocking(False)
        self.port = int(self._sock.getsockname()[1])
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._pending: dict[socket.socket, _Pending] = {}
        self._closed = False
        self.accept_errors = 0
        """Accept calls that failed (and were retried)."""
        self._thread = threading.Thread(target=self._run, name="stagewise-serve-accept", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the accept loop runs (it only stops on :meth:`close`)."""
        return self._thread.is_alive()

    def close(self) -> None:
        self._closed = True
        self._thread.join(5.0)
        for p in list(self._pending.values()):
            self._drop(p)
        self._sel.close()
        self._sock.close()

    # ------------------------------------------------------------------------------------------------ loop
    def _run(self) -> None:
        backoff = 0.0
        while not self._closed:
            try:
                now = time.monotonic()
                for p in [p for p in self._pending.values() if p.deadline <= now]:
                    log.warning("dropped a channel connection: no hello within %g s", self._hello_timeout_s)
                    self._drop(p)
                wait = min([0.2, *(p.deadline - now for p in self._pending.values())])
                for key, _ in self._sel.select(max(wait, 0.0)):
                    if key.fileobj is self._sock:
                        self._accept()
                    elif (p := self._pending.get(key.fileobj)) is not None:  # type: ignore[arg-type]
                        self._read(p)
                backoff = 0.0
            except OSError as exc:  # accept failed (EMFILE, ENFILE, ECONNABORTED, ENOBUFS...): back off and retry
                if self._closed:
                    return
                self.accept_errors += 1
                backoff = min(max(backoff * 2, _BACKOFF_S[0]), _BACKOFF_S[1])
                log.warning("worker channel: accept failed (%s); retrying in %.2f s", exc, backoff)
                time.sleep(backoff)
            except Exception:  # noqa: BLE001 - a bug here must not end the loop: no worker could ever rejoin
                log.exception("worker channel: unexpected error in the accept loop; continuing")
                time.sleep(_BACKOFF_S[0])

    def _accept(self) -> None:
        sock, _ = self._sock.accept()
        sock.setblocking(False)
        if len(self._pending) >= self._max_pending:
            oldest = min(self._pending.values(), key=lambda p: p.deadline)
            log.warning("worker channel: %d connections without a hello; dropping the oldest", len(self._pending))
            self._drop(oldest)
        nonce = secrets.token_hex(16)
        try:
            sock.send(encode_frame({"kind": "challenge", "nonce": nonce}))  # a few bytes: fits a fresh socket
        except OSError:
            sock.close()
            return
        p = _Pending(sock, nonce, time.monotonic() + self._hello_timeout_s)
        self._pending[sock] = p
        self._sel.register(sock, selectors.EVENT_READ, None)

    def _drop(self, p: _Pending) -> None:
        self._pending.pop(p.sock, None)
        try:
            self._sel.unregister(p.sock)
        except (KeyError, ValueError):
            pass
        p.sock.close()

    def _read(self, p: _Pending) -> None:
        try:
            chunk = p.sock.recv(p.need - len(p.buf))  # never past the hello: what follows belongs to the reader
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("dropped a channel connection during its hello: %s", exc)
            self._drop(p)
            return
        if not chunk:
            self._drop(p)
            return
        p.buf += chunk
        if len(p.buf) < p.need:
            return
        try:
            if p.need == PREFIX.size:
                head_len, data_len = PREFIX.unpack(p.buf)
                if not 0 < head_len <= MAX_HELLO_BYTES or data_len:
                    raise ChannelError(f"hello of {head_len}+{data_len} bytes: not a stagewise worker?")
                p.need += head_len
                return
            header = parse_header(p.buf[PREFIX.size:])
            fields = _fields(header)
            mac = header.get("mac")
            if header.get("kind") != "hello" or not isinstance(mac, str) or \
                    not hmac.compare_digest(mac, _mac(self._secret, p.nonce, fields)):
                raise ChannelError(f"hello from pid {fields.pid} failed authentication")
        except ChannelError as exc:
            log.warning("refused a channel connection from %s: %s", peer_address(p.sock), exc)
            self._drop(p)
            return
        self._pending.pop(p.sock)
        self._sel.unregister(p.sock)
        p.sock.setblocking(True)
        self._on_hello(p.sock, fields)
