"""Start one real process per rank (tests and the local launcher) and never leave one behind.

Each child runs ``fn(rank, world_size, port, *args)``. It reports back through its own one-way pipe as UTF-8 text
(``OK``, or ``FAIL`` plus the traceback), never a pickled exception. ``fn`` and ``args`` are handed to the child by
multiprocessing's forkserver start method, so ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

from ._errors import SpawnError

__all__ = ["find_free_port", "spawn"]

log = logging.getLogger(__name__)

_MAX_REPORT = 32 * 1024  # bytes of traceback sent back; keeps the pipe write from blocking
_GRACE = 2.0  # seconds a terminated child gets before SIGKILL


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _child_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple[Any, ...],
                conn: multiprocessing.connection.Connection) -> None:
    try:
        fn(rank, world_size, port, *args)
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit/KeyboardInterrupt
        text = traceback.format_exc()
        sys.stderr.write(f"[stagewise rank {rank}] {text}")
        sys.stderr.flush()
        data = text.encode("utf-8", "replace")
        if len(data) > _MAX_REPORT:
            data = b"...(truncated)...\n" + data[-_MAX_REPORT:]
        conn.send_bytes(b"FAIL\n" + data)
        conn.close()
        sys.stdout.flush()
        os._exit(1)  # skip atexit/destructors that could hang on a half-dead process group
    conn.send_bytes(b"OK")
    conn.close()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _context(preload: Sequence[str]) -> Any:
    """A forkserver context whose server imports ``preload`` once: later children start in milliseconds instead of
    re-importing torch (seconds each). The server itself never runs torch ops, so forking it is safe."""
    ctx = mp.get_context("forkserver")
    global _PRELOADED
    if preload and _PRELOADED is None:
        ctx.set_forkserver_preload(list(preload))
        _PRELOADED = tuple(preload)
    return ctx


_PRELOADED: tuple[str, ...] | None = None


def spawn(fn: Callable[..., Any], world_size: int, *, args: tuple[Any, ...] = (), timeout: float = 60.0,
          port: int | None = None, preload: Sequence[str] = ("torch",)) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` fresh processes and wait for all of them.

    Children are forked from a forkserver that imported ``preload`` (module names) once per parent process.

    ``port`` (default: :func:`find_free_port`) is a free port for the ranks' rendezvous. If any rank fails, or
    ``timeout`` seconds pass, every other rank is killed and :class:`SpawnError` is raised with the failing ranks'
    traceback text. Every child is reaped before this returns or raises.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    port = find_free_port() if port is None else port
    ctx = _context(preload)
    procs: list[Any] = []
    readers: dict[int, multiprocessing.connection.Connection] = {}
    failures: dict[int, str] = {}
    succeeded: set[int] = set()
    timed_out = False
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, args=(fn, rank, world_size, port, tuple(args), writer),
                            name=f"stagewise-rank{rank}")
            p.start()
            writer.close()  # the child holds the only write end: EOF here means it died without a word
            procs.append(p)
            readers[rank] = reader
        while len(succeeded) + len(failures) < world_size:
            for rank, reader in list(readers.items()):
                if not reader.poll():
                    continue
                try:
                    msg = reader.recv_bytes().decode("utf-8", "replace")
                except EOFError:  # died without reporting (segfault, os._exit, SIGKILL)
                    procs[rank].join(_GRACE)
                    msg = (f"FAIL\nrank {rank} {_describe_exit(procs[rank].exitcode)} without reporting a traceback "
                           "(it crashed, or failed before running fn: see its stderr; a script that calls spawn needs "
                           "the `if __name__ == '__main__':` guard)")
                reader.close()
                del readers[rank]
                if msg == "OK":
                    succeeded.add(rank)
                else:
                    failures[rank] = msg.removeprefix("FAIL\n")
            if failures:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            multiprocessing.connection.wait(list(readers.values()), timeout=min(left, 1.0))
        if not failures and not timed_out:
            for p in procs:  # all reported OK: let them exit on their own (process group teardown) before reaping
                p.join(max(0.0, deadline - time.monotonic()))
    finally:
        codes = _reap(procs)
        for reader in readers.values():
            reader.close()
    for rank in sorted(succeeded) if not failures and not timed_out else []:
        if codes[rank] != 0:  # reported OK but then crashed (or hung) on exit
            failures[rank] = f"rank {rank} finished fn but then {_describe_exit(codes[rank])}"
    if failures or timed_out:
        first = next(iter(failures), None)
        parts = []
        if timed_out:
            pending = sorted(set(range(world_size)) - succeeded - set(failures))
            parts.append(f"spawn: deadline of {timeout:.1f} s passed with ranks {pending} still running; all killed")
        else:
            parts.append(f"spawn: rank {first} failed; the other ranks were stopped")
        for rank, text in failures.items():
            parts.append(f"--- rank {rank} ---\n{text.rstrip()}")
        raise SpawnError("\n".join(parts), failures=failures, timed_out=timed_out)


def _reap(procs: list[Any]) -> list[int | None]:
    """Terminate, then kill, then join every process; none survives this. Returns the exit codes."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + _GRACE
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            log.warning("rank process %s ignored SIGTERM; killing it", p.name)
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    for p in procs:
        p.close()
    return codes
