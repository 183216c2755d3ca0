"""Run an ASGI app under uvicorn: in a background thread for tests and embedding, or blocking for the CLI.

Both apply :class:`HttpLimits` (header deadline, keep-alive timeout, connection cap) and raise the soft open-file
limit to the hard one first.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from ._http_guard import HttpLimits, raise_nofile_limit

__all__ = ["RunningServer", "run", "serve_app"]

logger = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind {host}:{port}: {exc}; pick another port (0 = any free one)") from exc
    sock.set_inheritable(True)
    return sock


class RunningServer:
    """A uvicorn server running in a daemon thread on a socket bound before it starts (so ``port`` is known)."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, thread: threading.Thread) -> None:
        self._server, self._sock, self._thread = server, sock, thread
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port`` without a scheme (what tritonclient's ``url`` wants)."""
        return self.url.removeprefix("http://")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut down gracefully (lifespan shutdown included); force it after ``timeout_s``; idempotent."""
        if self._thread.is_alive():
            self._server.should_exit = True
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("server at %s did not stop within %.1f s; forcing exit", self.url, timeout_s)
                self._server.force_exit = True
                self._thread.join(timeout_s)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError(f"server at {self.url} did not stop within {2 * timeout_s:.1f} s")

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _limited(limits: HttpLimits | None, uvicorn_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**(limits or HttpLimits()).uvicorn_options(raise_nofile_limit()), **uvicorn_kwargs}


def serve_app(app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
              startup_timeout_s: float = 30.0, limits: HttpLimits | None = None,
              **uvicorn_kwargs: Any) -> RunningServer:
    """Start ``app`` on ``host:port`` (port 0 = a free port) in a background thread; return once it accepts requests."""
    sock = _bind(host, port)
    config = uvicorn.Config(app, log_level=log_level, log_config=None, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5, **_limited(limits, uvicorn_kwargs))
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            errors.append(exc)

    bound = sock.getsockname()[1]
    thread = threading.Thread(target=target, name=f"stagewise-uvicorn-{bound}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        timed_out = time.monotonic() > deadline
        if not thread.is_alive() or timed_out:
            server.should_exit = True
            thread.join(5.0)
            sock.close()
            if errors:
                why = f"{type(errors[0]).__name__}: {errors[0]}"
            else:
                why = f"not started within {startup_timeout_s:.0f} s" if timed_out else "startup failed (see the log)"
            raise RuntimeError(f"server on {host}:{bound} did not start: {why}")
        time.sleep(0.01)
    return RunningServer(server, sock, thread)


def run(app: Any, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
        limits: HttpLimits | None = None, **uvicorn_kwargs: Any) -> None:
    """Serve ``app`` in the foreground until Ctrl-C / SIGTERM, then shut down cleanly (lifespan shutdown runs).

    uvicorn re-raises the signal that stopped it once it has shut down: the caller's handler (or the default action)
    then runs, so a SIGTERM still ends the process as one; a ``KeyboardInterrupt`` from it is swallowed here.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=10, **_limited(limits, uvicorn_kwargs))
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    logger.info("server on %s:%s stopped", host, port)
