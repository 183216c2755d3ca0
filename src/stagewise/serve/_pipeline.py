"""PipelineBackend: a model split into stages, served by replicas of stage-worker processes.

Each replica is ``stages`` worker processes in their own gloo group (own port); activations move between them with
DistTransport. The gateway talks to every worker through a local TCP channel that the *gateway* listens on
(``_channel``), so a worker's death is an EOF here, never a hang: the replica leaves the rotation at once, its
batches in flight are sent again to another replica (or wait for one), the rest of its processes are killed, and a
supervisor thread starts a new generation of it, which rejoins when all its stages report ready. A batch in flight
longer than ``worker_timeout_s`` fails its replica the same way (a stuck stage), and so does a worker whose heartbeat
(sent every ``heartbeat_timeout_s / 5`` by a thread of its own, so a long forward does not count) is older than
``heartbeat_timeout_s``: a stopped or hung process is found in seconds and its batches move to another replica.

A worker's liveness is its channel and its heartbeat, and its process state as the kernel reports it: never the
forkserver's word alone (once the forkserver dies, every child it started reads as exited with code 255); a start that
fails through a broken forkserver replaces it. A batch the model itself raises on is answered for that batch
(:class:`ModelError`, a 400); the worker and its replica go on.

A batch goes to stage 0 only (every input); the stages pass it on among themselves and the last answers (see
``_worker``).

Routing: the ready replica with the fewest batches in flight (at most ``inflight_per_replica`` each, default one per
stage so that every stage stays busy); batches wait in the backend when every replica is full. Each result carries the
compute time of every stage, reported through ``GatewayMetrics.observe_stage_time``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import logging
import multiprocessing.forkserver
import os
import pickle
import secrets
import signal
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from .._errors import ConfigError
from .._procs import running
from ..comm import find_free_port, remove_shm_segments
from ..launch import describe_exit as _describe_exit
from ..launch import forkserver_context as _context
from ._backend import InferenceBackend, ModelError, ModelMetadata, VersionedOutputs, numeric_tensor
from ._batching import BatchingConfig, Dropped, await_or_drop
from ._channel import Channel, ChannelError, Message
from ._join import assignment_to_wire
from ._listener import ChannelListener, HelloFields, peer_address
from ._live_update import LiveUpdates
from ._metrics import GatewayMetrics
from ._protocol import BackendError, BadRequestError, GatewayTimeoutError, ServiceUnavailableError, TensorValue
from ._ray_workers import RayWorker, ensure_ray
from ._replicas import PendingBatch, PipelineConfig, RemoteWorker, ReplicaState, ReplicaStatus, settle
from ._serving_split import describe_serving, load_serving_split, stage_assignments
from ._worker import WorkerConfig, worker_main

__all__ = ["PipelineBackend", "PipelineConfig", "ReplicaStatus"]

log = logging.getLogger(__name__)

# Imported once by the forkserver: a worker then starts in well under a second instead of re-importing torch and
# torch.export's lazily imported machinery (seconds per process).
_PRELOAD = ("torch", "torch.export", "torch._dynamo", "torch.export._trace", "stagewise.serve._worker")
_MAX_BACKOFF_S = 10.0
_STARTING_QUIET_S = 10.0
"""Silence a starting worker may keep (import and capture can hold the GIL for seconds under load); once ready,
``heartbeat_timeout_s`` applies."""


def _replace_forkserver() -> None:
    """Kill this process's forkserver after a start failed through it: the next start boots a fresh one
    (``ForkServer.ensure_running`` reaps a dead server and starts another). Workers it started live on."""
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid is not None and running(pid):
        log.warning("replacing the multiprocessing forkserver (pid %s)", pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class PipelineBackend(LiveUpdates, InferenceBackend):
    """Serve MODEL split into ``stages`` worker processes per replica, ``replicas`` replicas; see the module doc.

    Construction loads the model once here (metadata, weight digests), then starts every replica in the background:
    call :meth:`wait_ready` before serving, or let early requests wait for the first ready replica. :meth:`shutdown`
    (or ``await close()``) stops and reaps every worker. New weights while it serves: :meth:`load` (see
    ``_live_update``); ``repository``: the checkpoint root whose steps a load may name by version (default: the
    root of ``checkpoint``).
    """

    def __init__(self, model: str | PipelineConfig, *, stages: int = 2, replicas: int = 1, max_batch_size: int = 32,
                 name: str | None = None, host: str = "127.0.0.1", repository: str | None = None,
                 **options: Any) -> None:
        if isinstance(model, PipelineConfig):
            config = model
        else:
            config = PipelineConfig(model=model, stages=stages, replicas=replicas, max_batch_size=max_batch_size,
                                    name=name, host=host, **options)
        self.config = config
        self._init_versions(repository)
        module = config.model.rpartition(":")[0]  # a factory's module (not a file path, nor a folder as MODEL)
        preload = (*_PRELOAD, module) if module and "/" not in module and not module.endswith(".py") else _PRELOAD
        # Boots the forkserver: its imports (seconds) run while this process loads the model.
        self._ctx = _context(preload) if config.launcher == "local" else None
        self._owns_ray = config.launcher == "ray" and ensure_ray(config.stages * config.replicas)
        serving = load_serving_split(config.model, stages=config.stages, exclude_inputs=config.exclude_inputs,
                                     seed=config.seed, checkpoint=config.checkpoint, weights=config.weights,
                                     dtype=config.dtype, cuts=config.cuts, tasks=config.tasks, head=config.head,
                                     submodule=config.submodule)
        self.name, self.max_batch_size = config.name or serving.name, config.max_batch_size
        self._meta = describe_serving(serving, self.name)
        # Every batch-size bucket captured here, once: each worker gets its stage's graphs as data (no weights).
        assignments = stage_assignments(serving, config.max_batch_size)
        self._assignments = [pickle.dumps(a) for a in assignments]
        self._remote = config.remote_slots()
        # what a worker joining from another host gets: its position's assignment as JSON + StagePack bytes
        self._wire = {st: assignment_to_wire(assignments[st]) for st in {st for _, st in self._remote}}
        del assignments
        self._digests = {(self.current_version().label, pos): d for pos, d in serving.digests.items()}
        """Each (version, stage)'s weight digest, as the factory built it here (then dropped: the gateway holds no
        weights), or as the first worker reported it (weights from a file): every worker of it must report the same."""
        del serving
        self._output_names = [t.name for t in self._meta.outputs]
        self._cap = config.inflight_per_replica or config.stages
        workers = config.stages * config.replicas
        self._threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // (workers + 1))
        self._metrics: GatewayMetrics | None = None
        self._secret = secrets.token_hex(16)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._waiting: collections.deque[PendingBatch] = collections.deque()
        self._to_reap: list[Any] = []
        self._rr = 0
        self._replicas = [ReplicaState(i) for i in range(config.replicas)]
        self._listener = ChannelListener(config.host, self._secret, self._on_hello,
                                         max_pending=2 * workers + 16, hello_timeout_s=config.heartbeat_timeout_s)
        self._port = self._listener.port
        self._joins: ChannelListener | None = None
        self._join_host = "127.0.0.1"
        if self._remote:
            if not config.join_token:
                raise ConfigError("workers of other hosts (--remote) must prove they know a token: give --token or set "
                                  "STAGEWISE_TOKEN")
            host, _, port = (config.worker_listen or "").rpartition(":")
            self._join_host = host.strip("[]")
            self._joins = ChannelListener(self._join_host, config.join_token, self._on_join, port=int(port),
                                          max_pending=16, hello_timeout_s=config.heartbeat_timeout_s)
        self._supervisor = threading.Thread(target=self._supervise, name="stagewise-serve-supervisor", daemon=True)
        self._supervisor.start()
        atexit.register(self.shutdown)

    # ------------------------------------------------------------------------------------------------ public API
    def metadata(self) -> ModelMetadata:
        versions = self.served_versions()
        if versions != self._meta.versions:
            self._meta = dataclasses.replace(self._meta, versions=versions)
        return self._meta

    def ready(self) -> bool:
        """A replica serves, and failed ones can come back (the channel's accept loop and the supervisor run)."""
        with self._lock:
            up = not self._closed and any(r.state == "ready" for r in self._replicas)
        return up and self._listener.alive and self._supervisor.is_alive()

    def bind_metrics(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics
        with self._lock:
            for rep in self._replicas:
                metrics.set_replica_ready(self.name, rep.index, rep.state == "ready")

    def batching_config(self, **overrides: Any) -> BatchingConfig:
        """A :class:`BatchingConfig` that keeps every stage of every replica busy (``max_inflight``)."""
        return BatchingConfig(**{"max_inflight": self._cap * self.config.replicas, **overrides})

    def status(self) -> list[ReplicaStatus]:
        with self._lock:
            return [ReplicaStatus(index=r.index, generation=r.generation, state=r.state,
                                  pids=tuple(p.pid for p in r.procs if p.pid is not None), inflight=len(r.inflight),
                                  completed=r.completed, last_error=r.last_error, version=r.version)
                    for r in self._replicas]

    def wait_ready(self, timeout_s: float = 120.0, *, replicas: int = 1) -> None:
        """Block until ``replicas`` replicas are ready; ``TimeoutError``, or ``RuntimeError`` if they keep failing."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while sum(r.state == "ready" for r in self._replicas) < min(replicas, len(self._replicas)):
                if self._closed:
                    raise RuntimeError(f"pipeline backend {self.name!r} is closed")
                if all(r.failures >= 3 for r in self._replicas):
                    raise RuntimeError(f"every replica of {self.name!r} failed to start 3 times; last error: "
                                       f"{self._replicas[0].last_error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name!r}: fewer than {replicas} replicas ready after {timeout_s:g} s: "
                                       f"{self.status()}")
                self._cond.wait(min(left, 0.5))

    async def infer(self, inputs: Mapping[str, TensorValue]) -> dict[str, torch.Tensor]:
        inputs = {self._meta.aliases.get(k, k): v for k, v in inputs.items()}  # arg0 -> x, as requests may say
        tensors = {t.name: numeric_tensor(t.name, inputs[t.name], served_by="a pipeline") for t in self._meta.inputs}
        rows = int(next(iter(tensors.values())).shape[0])
        if not 0 < rows <= self.max_batch_size:
            raise BadRequestError(f"batch of {rows} rows; model {self.name!r} takes 1..{self.max_batch_size}")
        loop = asyncio.get_running_loop()
        req = PendingBatch(tensors, rows, loop, loop.create_future())
        with self._lock:
            self._dispatch(req)
        try:  # when this returns or raises, req.future is done: a late result is dropped, a waiting batch skipped
            return await await_or_drop(req.future, timeout_s=self.config.request_timeout_s)
        except Dropped:
            limit = self.config.request_timeout_s
            raise GatewayTimeoutError(f"model {self.name!r}: no replica answered within {limit:g} s "
                                      "(PipelineConfig.request_timeout_s)") from None

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self, grace_s: float = 2.0) -> None:
        """Stop every replica and reap every worker (they exit on their channel's EOF; stragglers are killed)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = list(self._waiting) + [q for r in self._replicas for q in r.inflight.values()]
            self._waiting.clear()
            for rep in self._replicas:
                rep.state = "stopped"
                rep.inflight.clear()
                self._drop_processes(rep, kill=False)
            self._cond.notify_all()
        atexit.unregister(self.shutdown)
        for req in pending:
            settle(req, error=ServiceUnavailableError(f"model {self.name!r} is shutting down"))
        self._supervisor.join(5.0)
        self._listener.close()
        if self._joins is not None:
            self._joins.close()
        with self._lock:
            procs, self._to_reap = self._to_reap, []
        end = time.monotonic() + grace_s
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.exitcode is None:
                log.warning("worker %s did not exit on EOF; killing it", p.name)
                p.kill()
                p.join(5.0)
            if p.exitcode is not None:
                p.close()
        log.info("pipeline backend %s stopped (%d workers reaped)", self.name, len(procs))
        if self._owns_ray:
            import ray

            ray.shutdown()

    # ------------------------------------------------------------------------------------------------ routing
    def _pick(self) -> ReplicaState | None:
        free = [r for r in self._replicas if r.state == "ready" and len(r.inflight) < self._cap]
        if not free:
            return None
        self._rr += 1
        n = len(self._replicas)
        return min(free, key=lambda r: (len(r.inflight), (r.index - self._rr) % n))

    def _dispatch(self, req: PendingBatch) -> None:
        """Send ``req`` to the least-loaded ready replica, or queue it; lock held."""
        if self._closed or self._unloaded:
            why = "is shutting down" if self._closed else "is unloaded (POST /v2/repository/models/NAME/load)"
            settle(req, error=ServiceUnavailableError(f"model {self.name!r} {why}"))
            return
        rep = self._pick()
        if rep is None:
            self._waiting.append(req)
            return
        seq, rep.next_seq = rep.next_seq, rep.next_seq + 1
        rep.inflight[seq] = req
        req.attempts += 1
        req.sent_at = time.monotonic()
        try:  # every input goes to stage 0, which passes on what later stages read (see _worker)
            rep.conns[0].send({"kind": "run", "seq": seq, "rows": req.rows}, req.inputs)
        except OSError as exc:
            self._fail(rep, rep.generation, f"sending batch {seq} failed: {exc}")

    def _drain(self) -> None:
        while self._waiting and not self._closed:
            if self._waiting[0].future.done():
                self._waiting.popleft()
                continue
            if self._pick() is None:
                return
            self._dispatch(self._waiting.popleft())

    def _fail(self, rep: ReplicaState, generation: int, reason: str) -> None:
        """Take a replica out of rotation, kill its workers, re-dispatch its batches, schedule a restart."""
        with self._cond:
            if rep.generation != generation or rep.state not in ("starting", "ready"):
                return
            rep.failures = 0 if rep.state == "ready" else rep.failures + 1
            backoff = min(self.config.restart_backoff_s * 2 ** max(rep.failures - 1, 0), _MAX_BACKOFF_S)
            rep.state, rep.restart_at = "failed", time.monotonic() + (backoff if rep.failures else 0.0)
            rep.last_error = reason if rep.crash is None else f"{reason}; {rep.crash}"
            log.warning("replica %s (generation %s) failed: %s; %d batches in flight retried; restart in %.1f s",
                        rep.index, generation, reason, len(rep.inflight), max(0.0, rep.restart_at - time.monotonic()))
            if self._metrics is not None:
                self._metrics.set_replica_ready(self.name, rep.index, False)
            self._drop_processes(rep, kill=True)
            orphans = list(rep.inflight.values())
            rep.inflight.clear()
            for req in orphans:
                if req.future.done():
                    continue
                if req.attempts >= self.config.max_attempts:
                    settle(req, error=BackendError(
                        f"model {self.name!r}: replicas failed {req.attempts} times while running this batch "
                        f"(PipelineConfig.max_attempts); last: {reason}"))
                else:
                    self._dispatch(req)
            self._cond.notify_all()

    def _drop_processes(self, rep: ReplicaState, *, kill: bool) -> None:
        for chan in rep.conns.values():
            chan.close()
        rep.conns, rep.ready, rep.beats = {}, set(), {}
        if kill:
            for p in rep.procs:
                p.kill()
        if self.config.transport == "shm" and rep.dist_port:  # rings of workers killed while attaching
            remove_shm_segments(rep.dist_port)
        self._to_reap.extend(rep.procs)
        rep.procs = []

    # ------------------------------------------------------------------------------------------------ channel side
    def _on_hello(self, sock: socket.socket, who: HelloFields) -> None:
        """Listener thread: an authenticated worker; its channel gets a reader thread if its replica expects it."""
        r, s, gen = who.replica, who.stage, who.generation
        chan = Channel(sock, send_timeout_s=self.config.worker_timeout_s)
        with self._lock:
            rep = self._replicas[r] if r < len(self._replicas) and s < self.config.stages else None
            if rep is None or rep.generation != gen or rep.state != "starting" or s in rep.conns:
                log.debug("ignoring a hello from replica %s generation %s stage %s (pid %s)", r, gen, s, who.pid)
                chan.close()
                return
            rep.conns[s], rep.beats[s] = chan, time.monotonic()
        try:
            threading.Thread(target=self._read_conn, args=(rep, gen, s, chan), daemon=True,
                             name=f"stagewise-serve-r{r}s{s}").start()
        except RuntimeError as exc:  # no thread to be had: the replica cannot run
            self._fail(rep, gen, f"no reader thread for stage {s}: {exc}")

    def _on_join(self, sock: socket.socket, who: HelloFields) -> None:
        """Join-listener thread: a worker of another host proved it knows the token; it gets the first open remote
        position (its config and stage as data), then is that position's channel like a local worker's hello."""
        with self._lock:
            open_slots = [(rep, st) for rep in self._replicas if rep.state == "starting"
                          for st in sorted(rep.remote_configs) if st not in rep.conns and st not in rep.joining]
            if not open_slots:
                log.info("a worker joined from %s but no remote position is open; it will try again",
                         peer_address(sock))
                sock.close()
                return
            rep, st = open_slots[0]
            rep.joining.add(st)
            gen, config = rep.generation, rep.remote_configs[st]
        header, tensors = self._wire[st]
        try:
            Channel(sock, send_timeout_s=self.config.worker_timeout_s).send(
                {"kind": "assign", "config": config, "assignment": header}, tensors)
        except OSError as exc:
            log.warning("could not hand replica %s stage %s to the worker at %s: %s", rep.index, st,
                        peer_address(sock), exc)
            with self._lock:
                rep.joining.discard(st)
            sock.close()
            return
        log.info("the worker at %s (pid %s) joined as replica %s stage %s", peer_address(sock), who.pid, rep.index, st)
        self._on_hello(sock, HelloFields(replica=rep.index, generation=gen, stage=st, pid=who.pid))

    def _read_conn(self, rep: ReplicaState, gen: int, s: int, chan: Channel) -> None:
        reason = f"stage {s} closed its channel"
        try:
            while (msg := chan.recv()) is not None:
                self._on_message(rep, gen, s, msg)
        except Exception as exc:  # noqa: BLE001 - any broken channel takes the replica down
            reason = f"stage {s} channel broke: {type(exc).__name__}: {exc}"
        self._fail(rep, gen, reason)
        chan.close()

    def _on_message(self, rep: ReplicaState, gen: int, stage: int, msg: Message) -> None:
        kind, h = msg.kind, msg.header
        req: PendingBatch | None = None
        with self._cond:
            if rep.generation != gen:
                return
            rep.beats[stage] = time.monotonic()  # every message counts as a heartbeat
            if kind == "ready":
                if h.get("digest") != self._digests.setdefault((str(h.get("version")), stage), str(h.get("digest"))):
                    rep.last_error = (f"stage {stage} built different weights than the gateway: the factory is not "
                                      "deterministic (seed it, or load a checkpoint)")
                    raise ChannelError(rep.last_error)
                rep.ready.add(stage)
                if len(rep.ready) == self.config.stages and rep.version_id != self.current_version().id:
                    raise ChannelError(f"replica {rep.index} started on version {rep.version!r} while "
                                       f"{self.current_version().label!r} was rolled out; it restarts on that")
                if len(rep.ready) == self.config.stages and rep.state == "starting":
                    rep.state, rep.failures = "ready", 0
                    log.log(logging.WARNING if gen > 1 else logging.INFO, "replica %s ready (generation %s, %.1f s)",
                            rep.index, gen, time.monotonic() - rep.started_at)
                    if self._metrics is not None:
                        self._metrics.set_replica_ready(self.name, rep.index, True)
                    self._drain()
                    self._cond.notify_all()
            elif kind in ("result", "error"):
                req = rep.inflight.pop(int(h["seq"]), None)
                rep.completed += kind == "result"
                self._drain()
            elif kind == "fatal":
                rep.crash = f"stage {stage} crashed: {str(h.get('message', ''))[-800:]}"
            elif kind in ("loaded", "load_failed"):
                self._on_load_reply(rep, gen, stage, kind, h)
        if req is None:
            return
        if kind == "error":
            settle(req, error=ModelError(self.name, str(h.get("error")), str(h.get("message")),
                                         where=f"stage {stage} of replica {rep.index}"))
            return
        missing = [n for n in self._output_names if n not in msg.tensors]
        if missing:
            settle(req, error=BackendError(f"model {self.name!r}: result without outputs {missing}"))
            return
        settle(req, result=VersionedOutputs({n: msg.tensors[n] for n in self._output_names},
                                            version=str(h.get("version", rep.version))))
        if self._metrics is not None:
            for s, seconds in enumerate(h.get("times", [])):
                self._metrics.observe_stage_time(self.name, str(s), float(seconds))

    # ------------------------------------------------------------------------------------------------ supervisor
    def _supervise(self) -> None:
        while True:
            to_start: list[ReplicaState] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                for rep in self._replicas:
                    if rep.state in ("starting", "ready"):
                        # the kernel has the last word: a forkserver child's exit code comes from the forkserver,
                        # and reads 255 for every child once the forkserver itself is gone
                        dead = [(s, p) for s, p in enumerate(rep.procs)
                                if p.exitcode is not None and not running(p.pid)]
                        quiet_s = self.config.heartbeat_timeout_s
                        if rep.state == "starting":  # capture holds the GIL for long C++ calls on a loaded machine
                            quiet_s = max(quiet_s, _STARTING_QUIET_S)
                        silent = [s for s, t in rep.beats.items() if now - t > quiet_s]
                        if dead:
                            s, p = dead[0]
                            self._fail(rep, rep.generation, f"stage {s} process {_describe_exit(p.exitcode)}")
                        elif silent:
                            self._fail(rep, rep.generation, f"stage {silent[0]} sent no heartbeat for "
                                                            f"{quiet_s:g} s "
                                                            "(PipelineConfig.heartbeat_timeout_s): stopped or hung")
                        elif rep.state == "starting" and now - rep.started_at > self.config.startup_timeout_s:
                            self._fail(rep, rep.generation, f"not ready within {self.config.startup_timeout_s:g} s "
                                                            "(PipelineConfig.startup_timeout_s)")
                        elif stuck := [q for q, r in rep.inflight.items()
                                       if now - r.sent_at > self.config.worker_timeout_s]:
                            self._fail(rep, rep.generation, f"batch {stuck[0]} not answered within "
                                                            f"{self.config.worker_timeout_s:g} s "
                                                            "(PipelineConfig.worker_timeout_s): a stage is stuck")
                    if rep.state == "failed" and now >= rep.restart_at:
                        rep.state = "restarting"
                        to_start.append(rep)
                gone = [p for p in self._to_reap if p.exitcode is not None]
                self._to_reap = [p for p in self._to_reap if p.exitcode is None]
            for p in gone:  # exit code known: the forkserver reaped it; release our sentinel
                p.close()
            for rep in to_start:
                self._start(rep)
            with self._cond:
                if not self._closed:
                    self._cond.wait(0.1)

    def _start(self, rep: ReplicaState) -> None:
        with self._lock:
            if self._closed:
                return
            rep.generation += 1
            rep.state, rep.started_at, rep.next_seq, rep.crash = "starting", time.monotonic(), 0, None
            gen = rep.generation
            source = self.worker_source()  # the version served now
            rep.version_id, rep.version = source["version_id"], source["version"]
            if gen > 1 and self._metrics is not None:
                self._metrics.count_restart(self.name, rep.index)
        cfg = self.config
        remote = {st for r, st in self._remote if r == rep.index}
        dist_host = self._join_host if remote else "127.0.0.1"  # stages on other hosts reach stage 0's rendezvous
        port = find_free_port(dist_host)
        with self._lock:
            rep.dist_port, rep.joining, rep.remote_configs = port, set(), {}
        procs: list[Any] = []
        try:
            for s in range(cfg.stages):
                wc = WorkerConfig(**dataclasses.asdict(cfg) | {"threads_per_worker": self._threads} | source, stage=s,
                                  replica=rep.index, generation=gen, gateway_port=self._port, secret=self._secret,
                                  dist_port=port, dist_host=dist_host, log_level=log.getEffectiveLevel())
                name, args = f"stagewise-serve-r{rep.index}s{s}", (wc.to_json(), self._assignments[s])
                if s in remote:  # a worker of another host joins for it (`stagewise worker --join`)
                    with self._lock:
                        rep.remote_configs[s] = dataclasses.replace(wc, secret="", join_token=None).to_json()
                    procs.append(RemoteWorker(name))
                    continue
                p = (RayWorker(args=args, name=name) if self._ctx is None else
                     self._ctx.Process(target=worker_main, args=args, daemon=True, name=name))
                p.start()
                procs.append(p)
        except Exception as exc:  # noqa: BLE001 - a failed start is retried like a crash, with a fresh forkserver
            log.exception("starting replica %s failed", rep.index)
            _replace_forkserver()
            with self._lock:
                rep.procs = procs
                self._fail(rep, gen, f"start failed: {exc}")
            return
        with self._lock:
            if rep.generation == gen and rep.state in ("starting", "ready") and not self._closed:
                rep.procs = procs
            else:
                for p in procs:
                    p.kill()
                self._to_reap.extend(procs)
