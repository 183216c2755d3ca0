"""What keeps unauthenticated HTTP clients from exhausting the gateway: connection limits on top of uvicorn.

uvicorn closes a keep-alive connection idle after a response (``timeout_keep_alive``), but never one that has not yet
sent a complete request head: a client that connects and says nothing, or trickles a header a byte at a time
(slowloris), holds a file descriptor forever, and a thousand of them starve the process (every accept, every file open
fails: the worker channel, the forkserver). :class:`HttpLimits` adds, per connection:

- a header deadline: the request head must be complete ``header_timeout_s`` after the connection opens or the next
  request begins, else the connection is closed;
- a connection cap: a request on a connection beyond ``max_connections`` is answered 503 (``Retry-After``,
  ``Connection: close``, the usual ``{"error"}`` body), and such a connection gets at most a second to send it.

:func:`raise_nofile_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard one at start (many systems default to 1024).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HttpLimits", "raise_nofile_limit"]

log = logging.getLogger(__name__)

_OVER_CAP_GRACE_S = 1.0


def raise_nofile_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (children inherit it); return the soft limit."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("raised the open-file limit from %s to %s", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit above %s: %s", soft, exc)
    return int(soft)


@dataclasses.dataclass(kw_only=True, frozen=True)
class HttpLimits:
    """Per-connection limits of the HTTP server (see the module doc)."""

    header_timeout_s: float = 10.0
    """A request head (request line and headers) must arrive within this many seconds."""
    keep_alive_s: float = 5.0
    """An idle keep-alive connection is closed after this many seconds (uvicorn's ``timeout_keep_alive``)."""
    max_connections: int | None = None
    """Open connections served at once; None = half the open-file limit (at most 10000)."""

    def __post_init__(self) -> None:
        for field in ("header_timeout_s", "keep_alive_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"HttpLimits.{field} must be > 0, got {getattr(self, field)}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"HttpLimits.max_connections must be >= 1 or None, got {self.max_connections}")

    def uvicorn_options(self, nofile: int) -> dict[str, Any]:
        """``uvicorn.Config`` keywords that apply these limits (``nofile``: the open-file limit)."""
        cap = self.max_connections if self.max_connections is not None else max(16, min(nofile // 2, 10_000))
        protocol = type("GuardedHttpToolsProtocol", (_Guarded,),
                        {"header_timeout_s": self.header_timeout_s, "max_connections": cap})
        return {"http": protocol, "timeout_keep_alive": self.keep_alive_s}


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The 503 answer to a request on a connection beyond the cap."""
    body = json.dumps({"error": "too many open connections; retry later (the server's --max-connections)"}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _Guarded(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and a connection cap (class attributes set per server)."""

    header_timeout_s: float = 10.0
    max_connections: int = 10_000
    _timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        over = len(self.connections) > self.max_connections
        self._arm(min(self.header_timeout_s, _OVER_CAP_GRACE_S) if over else self.header_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._timer is None:  # a later request on a kept-alive connection
            self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._disarm()
        if len(self.connections) <= self.max_connections:
            super().on_headers_complete()
            return
        app, self.app = self.app, _busy  # uvicorn starts the request with self.app, read in there
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()
