"""Start one real process per rank (tests and the local launcher) and never leave one behind.

Each child runs ``fn(rank, world_size, port, *args)``. It reports back through its own one-way pipe as UTF-8 text
(``OK``, or ``FAIL``, the exception's first line, then the traceback), never a pickled exception. ``fn`` and ``args``
are handed to the child by multiprocessing's forkserver start method, so ``fn`` must be importable (a module-level
function).

Stopping: the launcher owns SIGINT and SIGTERM (what Ctrl-C, ``timeout``, docker and systemd send). Children ignore
SIGINT (a terminal sends it to the whole process group; the launcher decides); on either signal the launcher sends
each child SIGUSR1, which sets :func:`stop_requested` there, so a training loop can stop at its next step boundary
(ranks of a pipeline must agree on which: see ``train``). Children that have not finished ``stop_grace`` seconds later
are killed. A second signal kills at once. Children that never ask (probes, timings: ``stoppable=False``) are killed
at the first signal, and :func:`spawn` raises ``KeyboardInterrupt`` (the command line's one line, no traceback).

Shared-memory segments a rank left behind (killed while attaching its rings: see :class:`~stagewise.comm.ShmTransport`)
are removed once every child is gone.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch.multiprocessing as mp

from .._procs import proc_state
from ..comm import SpawnError, find_free_port, remove_shm_segments

__all__ = ["STOP_SIGNAL", "describe_exit", "forkserver_context", "rendezvous_host", "request_stop",
           "set_rendezvous_host", "spawn", "stop_requested"]

log = logging.getLogger(__name__)

_MAX_REPORT = 32 * 1024  # bytes of traceback sent back; keeps the pipe write from blocking
_GRACE = 2.0  # seconds a terminated child gets before SIGKILL


_STOP = False
STOP_SIGNAL = signal.SIGUSR1
"""What the launcher sends a child to ask it to stop at its next step boundary."""


def stop_requested() -> bool:
    """True in a child of :func:`spawn` once its launcher was asked to stop (SIGINT or SIGTERM)."""
    return _STOP


def _on_stop(signum: int, frame: Any) -> None:
    request_stop()


def request_stop() -> None:
    """Make :func:`stop_requested` true in this process (what :data:`STOP_SIGNAL` does)."""
    global _STOP
    _STOP = True


_RENDEZVOUS_HOST = "127.0.0.1"


def rendezvous_host() -> str:
    """The address rank 0 serves the ranks' rendezvous on: the loopback for local ranks; under another launcher (Ray)
    rank 0's node address, set by that launcher before ``fn`` runs."""
    return _RENDEZVOUS_HOST


def set_rendezvous_host(host: str) -> None:
    global _RENDEZVOUS_HOST
    _RENDEZVOUS_HOST = host


def _child_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple[Any, ...],
                conn: multiprocessing.connection.Connection, beats: Any = None, every: float = 1.0) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher owns Ctrl-C and forwards it as STOP_SIGNAL
    signal.signal(STOP_SIGNAL, _on_stop)
    if beats is not None:
        threading.Thread(target=_beat, args=(beats, rank, every), name="stagewise-heartbeat", daemon=True).start()
    try:
        fn(rank, world_size, port, *args)
    except BaseException as exc:  # noqa: BLE001 - report everything, including SystemExit/KeyboardInterrupt
        text = traceback.format_exc()
        summary = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:2000]
        sys.stderr.write(f"[stagewise rank {rank}] {text}")
        sys.stderr.flush()
        data = text.encode("utf-8", "replace")
        if len(data) > _MAX_REPORT:
            data = b"...(truncated)...\n" + data[-_MAX_REPORT:]
        conn.send_bytes(b"FAIL\n" + summary.encode("utf-8", "replace").replace(b"\n", b" ") + b"\n" + data)
        conn.close()
        sys.stdout.flush()
        os._exit(1)  # skip atexit/destructors that could hang on a half-dead process group
    conn.send_bytes(b"OK")
    conn.close()


def _beat(beats: Any, rank: int, every: float) -> None:
    """The child's heartbeat: its slot of the shared array holds the last time (CLOCK_MONOTONIC, one clock for every
    process of the host) this thread ran. A thread of its own, so a long step or a wait does not count as silence;
    a stopped process (SIGSTOP, a debugger) or one that never releases the GIL does."""
    while True:
        beats[rank] = time.monotonic()
        time.sleep(every)


def describe_exit(code: int | None) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it), in words."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def forkserver_context(preload: Sequence[str]) -> Any:
    """A multiprocessing forkserver context whose server imports ``preload`` once: later children start in
    milliseconds instead of re-importing torch (seconds each). The server itself never runs torch ops, so forking it
    is safe. The server is started here (see :func:`_boot_forkserver`: Ctrl-C cannot reach it)."""
    ctx = mp.get_context("forkserver")
    global _PRELOADED
    if preload and _PRELOADED is None:
        ctx.set_forkserver_preload(list(preload))
        _PRELOADED = tuple(preload)
    _boot_forkserver()
    return ctx


def _boot_forkserver() -> None:
    """Start the forkserver now, if none runs, with SIGINT blocked: it imports its preload modules (seconds) before
    it ignores SIGINT itself, and a terminal's Ctrl-C in that window (sent to the whole process group) would end it
    with a traceback on the user's screen. The blocked mask survives exec; the forkserver and the processes it forks
    keep it (each leaves Ctrl-C to its launcher anyway). The imports then run while this process goes on.

    The standard library starts its resource tracker the same way, but unblocks SIGINT afterwards instead of
    restoring the mask: so it is started first, and the forkserver's own start then finds it running."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


_PRELOADED: tuple[str, ...] | None = None


def spawn(fn: Callable[..., Any], world_size: int, *, args: tuple[Any, ...] = (), timeout: float = 60.0,
          port: int | None = None, preload: Sequence[str] = ("torch",), stop_grace: float = 30.0,
          stoppable: bool = True, heartbeat: float | None = None) -> int | None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` fresh processes and wait for all of them.

    Children are forked from a forkserver that imported ``preload`` (module names) once per parent process.

    ``port`` (default: :func:`~stagewise.comm.find_free_port`) is a free port for the ranks' rendezvous. If any rank
    fails, or ``timeout`` seconds pass, every other rank is killed and :class:`SpawnError` is raised with the failing
    ranks' traceback text. Every child is reaped before this returns or raises.

    Returns None when every rank finished, or the signal number (SIGINT, SIGTERM) that stopped the run: the children
    were asked to stop (:func:`stop_requested`) and all finished within ``stop_grace`` seconds (else they are killed
    and :class:`SpawnError` says so). With ``stoppable`` False (``fn`` never asks :func:`stop_requested`: a probe, a
    timing) the first signal kills every child at once and ``KeyboardInterrupt`` is raised. Signals are handled only
    when called from the main thread.

    ``heartbeat`` (seconds): each child beats from a thread of its own (five times per period); a child silent that
    long (stopped by SIGSTOP or a debugger, or holding the GIL) counts as hung: it is killed and reported as the failed
    rank. In :class:`SpawnError`'s ``failures`` a hung rank comes first, then a rank killed by a signal from outside,
    then ranks that failed with an error (often only because a peer vanished).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    port = find_free_port() if port is None else port
    ctx = forkserver_context(preload)
    procs: list[Any] = []
    readers: dict[int, multiprocessing.connection.Connection] = {}
    failures: dict[int, str] = {}
    summaries: dict[int, str] = {}  # rank -> the exception's first line
    succeeded: set[int] = set()
    timed_out = False
    deadline = time.monotonic() + timeout
    stop = _StopRelay(procs, grace=stop_grace, kill=not stoppable)
    frozen: list[int] = []
    hung: list[int] = []
    beats = ctx.RawArray("d", world_size) if heartbeat is not None else None  # zero: no beat yet
    started: list[float] = []
    try:
        stop.install()
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child_main, name=f"stagewise-rank{rank}",
                            args=(fn, rank, world_size, port, tuple(args), writer, beats, (heartbeat or 5.0) / 5))
            p.start()
            started.append(time.monotonic())
            writer.close()  # the child holds the only write end: EOF here means it died without a word
            procs.append(p)
            readers[rank] = reader
            if stop.signum is not None:  # asked to stop while starting: the new child is asked too
                stop.forward()
        while len(succeeded) + len(failures) < world_size:
            for rank, reader in list(readers.items()):
                if not reader.poll():
                    continue
                try:
                    msg = reader.recv_bytes().decode("utf-8", "replace")
                except EOFError:  # died without reporting (segfault, os._exit, SIGKILL)
                    procs[rank].join(_GRACE)
                    why = f"rank {rank} {describe_exit(procs[rank].exitcode)} without reporting a traceback"
                    msg = (f"FAIL\n{why}\n{why} (it crashed, or failed before running fn: see its stderr; a script "
                           "that calls spawn needs the `if __name__ == '__main__':` guard)")
                reader.close()
                del readers[rank]
                if msg == "OK":
                    succeeded.add(rank)
                else:
                    summaries[rank], _, failures[rank] = msg.removeprefix("FAIL\n").partition("\n")
            if beats is not None and heartbeat is not None and not failures:
                hung = _silent(procs, beats, started, sorted(readers), heartbeat)
                for rank in hung:
                    summaries[rank] = failures[rank] = (f"rank {rank} sent no heartbeat for {heartbeat:.1f} s "
                                                        f"({_state(procs[rank].pid)}): it counts as hung; killed")
                    procs[rank].kill()
            if failures or stop.forced:
                break
            left = min(deadline, stop.deadline) - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            multiprocessing.connection.wait(list(readers.values()), timeout=min(left, 0.5))
        frozen = _frozen(procs) if failures or timed_out else []  # before the reap: a stopped rank explains a timeout
        if failures:  # before the reap: a rank killed from outside is the cause, not the peers that lost it
            failures, summaries = _cause_first(procs, failures, summaries, hung)
        if not failures and not timed_out and not stop.forced:
            for p in procs:  # all reported OK: let them exit on their own (process group teardown) before reaping
                p.join(max(0.0, min(deadline, stop.deadline) - time.monotonic()))
    finally:
        stop.uninstall()
        codes = _reap(procs)
        for reader in readers.values():
            reader.close()
        remove_shm_segments(port)  # what ranks killed while attaching their shared-memory rings left behind
    if stop.signum is not None and not stoppable:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(stop.signum).name}")
    ended = not failures and not timed_out and not stop.forced
    for rank in sorted(succeeded) if ended else []:
        if codes[rank] != 0:  # reported OK but then crashed (or hung) on exit
            failures[rank] = f"rank {rank} finished fn but then {describe_exit(codes[rank])}"
    if failures or timed_out or stop.forced:
        first = next(iter(failures), None)
        pending = sorted(set(range(world_size)) - succeeded - set(failures))
        parts = []
        if stop.signum is not None and (timed_out or stop.forced):
            why = "a second signal came" if stop.forced else f"they did not stop within {stop.grace:.1f} s"
            parts.append(f"spawn: stopped by {signal.Signals(stop.signum).name}; ranks {pending} were killed because "
                         f"{why}")
        elif timed_out:
            frozen_note = f" (ranks {frozen} were stopped: SIGSTOP or a debugger)" if frozen else ""
            parts.append(f"spawn: deadline of {timeout:.1f} s passed with ranks {pending} still running{frozen_note}; "
                         "all killed")
        else:
            cause = (f"ranks {frozen} were stopped (SIGSTOP or a debugger) and the others timed out waiting: "
                     if frozen and first not in hung else "")
            headline = summaries.get(first) or failures[first].splitlines()[0]
            parts.append(f"spawn: {cause}rank {first} failed: {headline}; "
                         "the other ranks were stopped")
        for rank, text in failures.items():
            parts.append(f"--- rank {rank} ---\n{text.rstrip()}")
        raise SpawnError("\n".join(parts), failures=failures, timed_out=timed_out, signum=stop.signum)
    return stop.signum


def _silent(procs: list[Any], beats: Any, started: list[float], running: list[int], heartbeat: float) -> list[int]:
    """The ranks among ``running`` whose last heartbeat (or start, before the first) is over ``heartbeat`` s old."""
    now = time.monotonic()
    return [rank for rank in running
            if procs[rank].exitcode is None and now - (beats[rank] or started[rank]) > heartbeat]


def _state(pid: int | None) -> str:
    """How ``/proc`` sees a process, in words."""
    state = proc_state(pid)
    if state is None:
        return "its process is gone"
    return "its process is stopped: SIGSTOP or a debugger" if state in ("T", "t") else f"process state {state}"


def _cause_first(procs: list[Any], failures: dict[int, str], summaries: dict[int, str],
                 hung: list[int]) -> tuple[dict[int, str], dict[int, str]]:
    """``failures`` reordered so the likely cause leads: hung ranks, then ranks a signal killed (SIGKILL from
    outside, the OOM killer: their pipe may not have been read yet, so they are added here), then the rest."""
    settle = time.monotonic() + 0.3  # a killed process closes its sockets (peers fail) before it can be reaped
    for p in procs:
        p.join(max(0.0, settle - time.monotonic()))
    killed = [r for r, p in enumerate(procs) if r not in hung and p.exitcode is not None and p.exitcode < 0]
    for rank in killed:
        if rank not in failures:
            summaries[rank] = f"rank {rank} {describe_exit(procs[rank].exitcode)} without reporting a traceback"
            failures[rank] = summaries[rank]
    order = hung + killed + [r for r in failures if r not in hung and r not in killed]
    return {r: failures[r] for r in order}, summaries


def _frozen(procs: list[Any]) -> list[int]:
    """The ranks whose process is stopped (state T or t in ``/proc``: SIGSTOP, a debugger), not merely slow."""
    return [rank for rank, p in enumerate(procs) if proc_state(p.pid) in ("T", "t")]


class _StopRelay:
    """The launcher's SIGINT/SIGTERM handler while :func:`spawn` waits: the first signal asks every child to stop
    (:data:`STOP_SIGNAL`) and starts ``grace``; a second one (or, with ``kill``, the first) makes spawn kill them at
    once. The previous handlers come back afterwards."""

    def __init__(self, procs: list[Any], *, grace: float, kill: bool = False) -> None:
        self.procs, self.grace, self.kill = procs, grace, kill
        self.signum: int | None = None
        self.forced = False
        self.deadline = float("inf")
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.forced = True
            return
        self.signum = signum
        if self.kill:
            self.forced = True
            return
        self.deadline = time.monotonic() + self.grace
        log.warning("received %s: asking %d rank(s) to stop at their next step boundary (%.0f s grace)",
                    signal.Signals(signum).name, len(self.procs), self.grace)
        self.forward()

    def forward(self) -> None:
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, STOP_SIGNAL)
                except ProcessLookupError:
                    pass


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
