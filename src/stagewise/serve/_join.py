"""Stage workers on other hosts: ``stagewise worker --join GATEWAY_HOST:PORT`` takes a chain position the gateway
left open (``stagewise serve ... --remote REPLICA:STAGE --worker-listen HOST:PORT``).

The join, on one TCP connection that then stays the worker's channel::

    gateway -> worker   challenge {nonce}
    worker  -> gateway  hello {replica 0, generation 0, stage 0, pid, mac}   mac keyed by the shared token
    gateway -> worker   assign {config, assignment} + the stage's graphs    (or it closes: no position is open)
    ...                 then the channel of a local worker (ready, run/result, beat...)

The token never travels (HMAC over a fresh nonce, see ``_listener``); a wrong or missing token is refused and logged by
the gateway with the peer's address. Nothing on the wire is pickled: the assignment is JSON and each bucket's stage is
:meth:`StagePack.to_bytes` (JSON and safetensors, operators from a whitelist), rebuilt after the factory's module is
imported. MODEL's code (and any weight files it names) must be at the same path on the worker's host.

``stagewise worker`` keeps one worker process at a time and starts another when it ends (killed, crashed, or its
replica restarted: the gateway then waits for a join again), until the gateway cannot be reached for
``--join-timeout`` seconds in a row, or SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import torch

from .._spec import import_model_code
from ..split import StagePack
from ._channel import Channel, ChannelError
from ._listener import HelloFields, client_handshake
from ._serving_split import StageAssignment

__all__ = ["assignment_from_wire", "assignment_to_wire", "join_main", "run_worker_loop"]

log = logging.getLogger(__name__)


def assignment_to_wire(a: StageAssignment) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A :class:`StageAssignment` as a JSON-able header and one uint8 tensor per bucket's stage bytes."""
    header = {"buckets": sorted(a.packs), "next_recv": {str(k): v for k, v in a.next_recv.items()},
              "forwarded": list(a.forwarded), "forwarded_next": list(a.forwarded_next),
              "aliases": {k: list(v) for k, v in a.aliases.items()}}
    tensors = {f"pack{rows}": torch.frombuffer(bytearray(a.packs[rows].to_bytes()), dtype=torch.uint8)
               for rows in header["buckets"]}
    return header, tensors


def assignment_from_wire(header: dict[str, Any], tensors: dict[str, torch.Tensor],
                         trusted_modules: list[str]) -> StageAssignment:
    """The inverse of :func:`assignment_to_wire` (a malformed message raises ``ChannelError``)."""
    try:
        buckets = [int(rows) for rows in header["buckets"]]
        packs = {rows: StagePack.from_bytes(tensors[f"pack{rows}"].numpy().tobytes(), trusted_modules=trusted_modules)
                 for rows in buckets}
        return StageAssignment(packs=packs, next_recv={int(k): [str(n) for n in v]
                                                       for k, v in header["next_recv"].items()},
                               forwarded=[str(n) for n in header["forwarded"]],
                               forwarded_next=[str(n) for n in header["forwarded_next"]],
                               aliases={str(k): [str(n) for n in v] for k, v in header["aliases"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ChannelError(f"the gateway's stage assignment is malformed: {type(exc).__name__}: {exc}") from exc


def join_main(host: str, port: int, token: str, *, timeout_s: float = 30.0) -> None:
    """Join the gateway at ``host:port``, take the position it assigns and serve it until the channel ends (this
    process's entry point: a failure is reported to the gateway when it can be, and ends the process)."""
    from ._worker import WorkerConfig, serve_stage

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the `stagewise worker` parent decides
    sock = socket.create_connection((host, port), timeout=timeout_s)
    chan = Channel(sock, send_timeout_s=timeout_s)
    client_handshake(chan, token, HelloFields(replica=0, generation=0, stage=0, pid=os.getpid()),
                     timeout_s=timeout_s)
    sock.settimeout(timeout_s)
    msg = chan.recv()
    if msg is None or msg.kind != "assign":
        raise ChannelError(f"the gateway at {host}:{port} assigned no stage (no remote position open, or the token "
                           "was refused: its log says which)")
    sock.settimeout(None)
    cfg = WorkerConfig.from_json(str(msg.header.get("config")))
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s %(levelname)s [replica {cfg.replica} stage "
                                                      f"{cfg.stage}] %(name)s: %(message)s", force=True)
    assignment = assignment_from_wire(msg.header.get("assignment") or {}, msg.tensors, import_model_code(cfg.model))
    torch.set_num_threads(cfg.threads_per_worker or 1)
    log.warning("joined %s:%s as replica %s stage %s (pid %s)", host, port, cfg.replica, cfg.stage, os.getpid())
    serve_stage(cfg, chan, assignment)


def _child(host: str, port: int, token: str) -> None:
    try:
        join_main(host, port, token)
    except (OSError, ChannelError) as exc:
        print(f"stagewise worker: join failed: {exc}", file=sys.stderr, flush=True)
        os._exit(3)


def run_worker_loop(host: str, port: int, token: str, *, join_timeout_s: float, wait_s: float = 300.0) -> int:
    """Keep one joined worker process; start another when it ends; stop when the gateway, once reached, stays
    unreachable for ``join_timeout_s`` (or is not reached within ``wait_s`` at first) (exit 0), or on SIGINT/SIGTERM
    (exit 128 + signal)."""
    from ..launch import forkserver_context

    ctx = forkserver_context(("torch", "torch.export", "stagewise.serve._worker"))
    stopped: list[int] = []
    proc: Any = None

    def on_signal(signum: int, _frame: Any) -> None:
        stopped.append(signum)
        if proc is not None and proc.is_alive():
            proc.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    unreachable_since: float | None = time.monotonic()
    limit = wait_s  # until the gateway is first reached
    while not stopped:
        try:
            socket.create_connection((host, port), timeout=5.0).close()
        except OSError as exc:
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > limit:
                print(f"stagewise worker: the gateway at {host}:{port} is unreachable ({exc.strerror or exc}) for "
                      f"{limit:g} s; stopping", file=sys.stderr, flush=True)
                return 0
            time.sleep(0.5)
            continue
        unreachable_since, limit = None, join_timeout_s
        proc = ctx.Process(target=_child, args=(host, port, token), name="stagewise-worker")
        proc.start()
        proc.join()
        if not stopped:
            log.warning("the worker process ended (%s); joining again", proc.exitcode)
            time.sleep(0.5)
    return 128 + stopped[0]
