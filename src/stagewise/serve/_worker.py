"""One stage-worker process of a serving pipeline replica, and the model preparation it shares with the gateway.

A worker connects to the gateway's channel (answers its challenge with an authenticated hello, see ``_listener``),
starts a heartbeat thread (a beat every ``heartbeat_s``: the gateway fails a silent worker, so a stopped process is
found in seconds, while a long forward on the main thread still beats), takes its stage as the gateway captured it
for every batch-size bucket (a :class:`StageAssignment`: graphs without weights; the worker captures nothing), gets
its own stage's weights alone (read from the files, or from the factory's model, whose other weights it drops), joins
its replica's own gloo group (rank = stage), and reports ready with a digest of its stage's weights (the gateway
checks it against the factory's: a factory that builds different weights in different processes is caught).

Then batch after batch, in sequence: stage 0 takes a ``run`` message (seq, rows, every model input) from its channel; a
later stage receives from the stage before it (DistTransport, or ShmTransport with ``--transport shm``; tag = seq mod
2**20) the batch's row count, the stage times so far, the model inputs that it or a later stage reads, and its
activations. Each stage runs (the runtime's :func:`~stagewise.runtime.run_forward`, the stage runner training's executor
uses, here under inference mode; why not a schedule on the executor itself: see that module) and sends on; the last one
answers the gateway over its channel. Only stage 0 hears from the gateway per batch: a later stage is woken once, when
its input arrives (on a small machine, waking every stage at dispatch costs the first stage its core).

Batches are padded to a captured size and cut back (see ``_serving_split``).

New weights while serving (``_weight_swap``, ``_live_update``): a ``load`` is read in a thread of its own into spare
memory while batches go on; stage 0 switches on ``switch`` and stamps each batch with the version id it ran, and a
later stage switches with the first batch stamped with the new id; the last stage names the version in its result.

Stage 0 exits when its channel reaches EOF (the gateway closed it, or died); a later stage exits when the stage before
it does (its wait breaks): no worker outlives its gateway.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import logging
import os
import pickle
import signal
import socket
import threading
import time
from typing import Any

import torch

from .._allocator import tune_allocator
from .._spec import import_model_code
from ..comm import CommError, DistTransport, SendHandle, ShmTransport, interface_towards, use_interface
from ..runtime import run_forward
from ..split import Stage
from ._channel import Channel, report_fatal, start_heartbeat
from ._listener import HelloFields, client_handshake
from ._replicas import PipelineConfig
from ._serving_split import StageAssignment, bucket_rows, load_stage_weights, pad_rows, stage_digest
from ._weight_swap import StageVersions

__all__ = ["WorkerConfig", "serve_stage", "worker_main"]

log = logging.getLogger(__name__)

TAG_SPACE = 1 << 20
"""Activation tags are ``seq % TAG_SPACE``."""
_LOAD_NICE = 10
"""Niceness of the thread that loads a new weights version while batches run."""
_IDLE_WAIT_S = 10.0 * 365 * 24 * 3600
"""How long a later stage waits for its next batch: as long as the service idles (see ``serve_forever``)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class WorkerConfig(PipelineConfig):
    """The backend's :class:`PipelineConfig` (``threads_per_worker`` resolved) plus this worker's place; travels to
    the process as JSON. ``host`` is where the gateway's channel listens; ``worker_timeout_s`` is the deadline of
    every gloo wait (and of the rendezvous)."""

    stage: int
    """This worker's stage (its rank in the replica's group of ``stages``)."""
    replica: int
    """Replica index."""
    generation: int
    """Start count of this replica; the gateway ignores workers of older generations."""
    gateway_port: int
    """Port of the gateway's channel."""
    secret: str
    """Shared secret that authenticates the hello (it never travels: see ``_listener``)."""
    dist_port: int
    """Free port of this replica's gloo rendezvous (stage 0 listens)."""
    dist_host: str = "127.0.0.1"
    """Address of that rendezvous: the loopback, or the gateway host's --worker-listen address when a stage of the
    replica runs on another host."""
    log_level: int = logging.WARNING
    """Logging level of the worker process (the gateway's effective level)."""
    version_id: int = 0
    """Id of the weights version it starts with (the gateway numbers the versions it loads; see ``_weight_swap``)."""
    version: str = "1"
    """That version's label, reported with every answer (``model_version``)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))


class _StageWorker:
    def __init__(self, cfg: WorkerConfig, chan: Channel, assignment: StageAssignment) -> None:
        self.cfg, self.chan, self.assignment = cfg, chan, assignment
        self.last = cfg.stage == cfg.stages - 1
        t0 = time.perf_counter()
        own = load_stage_weights(assignment, model=cfg.model, seed=cfg.seed, checkpoint=cfg.checkpoint,
                                 weights=cfg.weights, dtype=cfg.dtype, submodule=cfg.submodule)
        assignment.fill(own)
        self._check_holds_only(own)
        self.versions = StageVersions(own, id=cfg.version_id, label=cfg.version)
        # batch rows -> (this stage, names of the values the next stage receives, in its order)
        self._stages: dict[int, tuple[Stage, list[str]]] = {
            rows: (next(iter(pack.stages.values())), assignment.next_recv[rows])
            for rows, pack in assignment.packs.items()}
        self.digest = stage_digest(next(iter(self._stages.values()))[0])
        t1 = time.perf_counter()
        self.transport: DistTransport | ShmTransport | None = None
        if cfg.stages > 1:
            if cfg.dist_host != "127.0.0.1" and (iface := interface_towards(cfg.dist_host)) is not None:
                use_interface(iface)  # a stage on another host: gloo talks through the link that reaches stage 0
            kind = ShmTransport if cfg.transport == "shm" else DistTransport
            self.transport = kind.init(rank=cfg.stage, world_size=cfg.stages, master_addr=cfg.dist_host,
                                       master_port=cfg.dist_port, timeout=cfg.worker_timeout_s)
        log.info("replica %s stage %s: weights in %.2f s, rendezvous in %.2f s", cfg.replica, cfg.stage, t1 - t0,
                 time.perf_counter() - t1)
        self._sends: collections.deque[SendHandle] = collections.deque()
        # Model inputs read by the stages after this one travel with the activations (the gateway sends every input
        # to stage 0 only), in the metadata's input order: what this stage receives, and what it passes on.
        self.forwarded = assignment.forwarded
        self.forwarded_next = assignment.forwarded_next

    def _check_holds_only(self, own: dict[str, torch.nn.Parameter]) -> None:
        """The memory promise, checked in every worker: it holds exactly its own stage's parameters."""
        held = {id(p): p for pack in self.assignment.packs.values() for st in pack.stages.values()
                for p in st.module.parameters()}
        if any(p.is_meta for p in held.values()) or set(held) != {id(p) for p in own.values()}:
            raise RuntimeError(f"worker of stage {self.cfg.stage} holds other parameters than its own stage's "
                               "(please report this as a bug)")

    def stage_for(self, rows: int) -> tuple[Stage, list[str]]:
        """This stage for batches of ``rows`` rows (a bucket the gateway captured)."""
        return self._stages[rows]

    def serve_forever(self) -> None:
        """Run batches in order until the gateway goes away, then exit the process.

        Stage 0 reads each batch from its channel, on this thread (a reader thread would cost a thread hand-off per
        batch; the gateway's sends never block on us); EOF (gateway gone or closing) ends the process. A later stage
        waits only on the stage before it, for the next batch in sequence: the gateway announces nothing to it, so it
        is not woken for a batch until its input is there. It may wait as long as the service idles; a peer that dies
        breaks the wait at once, and the gateway fails a replica whose batch stays in flight too long.
        """
        cfg = self.cfg
        self.chan.send({"kind": "ready", "stage": cfg.stage, "digest": self.digest, "version": self.versions.label})
        if cfg.stage > 0:
            threading.Thread(target=self._control, name="stagewise-serve-control", daemon=True).start()
            seq = 0
            while True:
                try:
                    rows, ok, version, times, inputs, recv = self._receive(seq)
                    self.run_one(seq, rows=rows, ok=ok, version=version, times=times, inputs=inputs, recv=recv)
                except (CommError, OSError) as exc:  # a neighbour or the gateway is gone (shutdown, or a crash the
                    log.debug("replica %s stage %s: %s", cfg.replica, cfg.stage, exc)  # gateway sees itself)
                    os._exit(0)
                seq += 1
        try:
            while (msg := self.chan.recv()) is not None:
                if msg.kind == "run":
                    self.run_one(int(msg.header["seq"]), rows=int(msg.header["rows"]), ok=True,
                                 version=self.versions.id, times=[], inputs=msg.tensors, recv=[])
                elif msg.kind == "switch":  # between two batches: every later batch runs on the new version
                    self.versions.use(int(msg.header["id"]))
                elif msg.kind == "load":  # in the background: batches go on meanwhile
                    threading.Thread(target=self._load, args=(msg.header,), name="stagewise-serve-load",
                                     daemon=True).start()
                elif msg.kind == "discard":
                    self.versions.discard(int(msg.header["id"]))
                else:
                    log.warning("replica %s stage 0: ignoring message kind %r", cfg.replica, msg.kind)
        except OSError as exc:  # any broken channel means the gateway is gone (ChannelError is an OSError)
            log.debug("replica %s stage 0: channel broke: %s", cfg.replica, exc)
        os._exit(0)

    def _control(self) -> None:
        """A later stage's channel reader (the gateway sends it only weight versions to load or drop); ends on EOF
        (the process then ends with the stage before it)."""
        try:
            while (msg := self.chan.recv()) is not None:
                if msg.kind == "load":
                    self._load(msg.header)
                elif msg.kind == "discard":
                    self.versions.discard(int(msg.header["id"]))
        except OSError as exc:
            log.debug("replica %s stage %s: channel broke: %s", self.cfg.replica, self.cfg.stage, exc)

    def _load(self, header: dict[str, Any]) -> None:
        """Load a weights version into spare memory and say how it went (``loaded`` or ``load_failed``, why)."""
        cfg, vid = self.cfg, int(header["id"])
        try:  # Linux: this thread only; batches keep the CPU first, the load takes what is left
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOAD_NICE)
        except (AttributeError, OSError):
            pass
        t0 = time.perf_counter()
        try:
            self.versions.load(vid, str(header["version"]), str(header["checkpoint"]),
                               aliases=self.assignment.aliases, dtype=getattr(torch, cfg.dtype),
                               verify=str(header.get("verify", "sha256")))
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint fails the load, never the worker
            log.warning("replica %s stage %s: loading version %s failed: %s", cfg.replica, cfg.stage,
                        header.get("version"), exc)
            self._tell({"kind": "load_failed", "id": vid, "stage": cfg.stage,
                        "message": f"{type(exc).__name__}: {exc}"[:4000]})
            return
        self._tell({"kind": "loaded", "id": vid, "stage": cfg.stage, "seconds": time.perf_counter() - t0})

    def _tell(self, header: dict[str, Any]) -> None:
        try:
            self.chan.send(header)
        except OSError:  # the gateway is gone: the process is on its way out
            pass

    def _receive(self, seq: int) -> tuple[int, bool, int, list[float], dict[str, torch.Tensor], list[Any]]:
        """Batch ``seq`` from the stage before, sent as ``[ok, rows, version id, n_times, *times, n_inputs, *model
        inputs (name order), *values this stage receives]``: (rows, ok, version, times, inputs, received values)."""
        assert self.transport is not None
        values = self.transport.recv(src=self.cfg.stage - 1, tag=seq % TAG_SPACE, timeout=_IDLE_WAIT_S)
        ok, rows, version, n = values[0] == 0, int(values[1]), int(values[2]), int(values[3])  # type: ignore[arg-type]
        times = [float(t) for t in values[4:4 + n]]  # type: ignore[arg-type]
        k = int(values[4 + n])  # type: ignore[arg-type]
        inputs = dict(zip(self.forwarded, values[5 + n:5 + n + k]))
        return rows, ok, version, times, inputs, values[5 + n + k:]  # type: ignore[return-value]

    def run_one(self, seq: int, *, rows: int, ok: bool, version: int, times: list[float],
                inputs: dict[str, torch.Tensor], recv: list[Any]) -> None:
        """Run batch ``seq`` on weights version ``version`` (unless a stage before failed it: ``ok`` False) and pass
        it on."""
        cfg = self.cfg
        send: list[Any] = []
        result: dict[str, torch.Tensor] = {}
        label = self.versions.label
        if ok:
            try:
                label = self.versions.use(version)  # a later stage switches with the first batch of a new version
                if not 0 < rows <= cfg.max_batch_size:
                    raise ValueError(f"batch of {rows} rows; this pipeline takes 1..{cfg.max_batch_size}")
                padded = bucket_rows(rows, cfg.max_batch_size)
                stage, next_names = self.stage_for(padded)
                mine = {n: pad_rows(inputs[n], padded) for n in stage.spec.inputs}
                ran = run_forward(stage, recv, mine, grad=False, next_recv=next_names)  # the runtime's, as training's
                times.append(ran.seconds)
                send = ran.send
                if self.last:
                    result = {name: out[:rows] for name, out in zip(stage.spec.outputs, ran.outputs)}
            except Exception as exc:  # noqa: BLE001 - one bad batch fails that batch, not the worker
                ok = False
                log.exception("replica %s stage %s failed on batch %s", cfg.replica, cfg.stage, seq)
                self.chan.send({"kind": "error", "seq": seq, "stage": cfg.stage, "error": type(exc).__name__,
                                "message": str(exc)[:4000]})
        if not self.last:  # always sent, failed or not: the next stage expects every batch in sequence
            assert self.transport is not None
            later = [inputs[n] for n in self.forwarded_next] if ok else []
            payload = [0 if ok else 1, rows, version, len(times), *times, len(later), *later, *(send if ok else [])]
            self._sends.append(self.transport.isend(payload, dst=cfg.stage + 1, tag=seq % TAG_SPACE))
            while len(self._sends) > 2:  # bounded: the next stage takes them in order
                self._sends.popleft().wait(cfg.worker_timeout_s)
        elif ok:
            self.chan.send({"kind": "result", "seq": seq, "times": times, "version": label}, result)



def worker_main(config_json: str, assignment_bytes: bytes) -> None:
    """Process entry point (module level, so the forkserver can start it). ``assignment_bytes``: this worker's
    :class:`StageAssignment`, pickled by the gateway that starts this process on this machine (never data from the
    network or a file)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the gateway, which then closes our channel
    cfg = WorkerConfig.from_json(config_json)
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s %(levelname)s [replica {cfg.replica} stage "
                                                      f"{cfg.stage}] %(name)s: %(message)s")
    tune_allocator()
    torch.set_num_threads(cfg.threads_per_worker or 1)
    sock = socket.create_connection((cfg.host, cfg.gateway_port), timeout=30.0)
    chan = Channel(sock, send_timeout_s=cfg.worker_timeout_s)
    try:
        client_handshake(chan, cfg.secret, HelloFields(replica=cfg.replica, generation=cfg.generation,
                                                       stage=cfg.stage, pid=os.getpid()), timeout_s=30.0)
        import_model_code(cfg.model)  # custom operators the graphs call are registered by the factory's module
        assignment = pickle.loads(assignment_bytes)
    except BaseException:  # noqa: BLE001 - tell the gateway why, then go
        report_fatal(chan, f"stagewise serve replica {cfg.replica} stage {cfg.stage}")
    serve_stage(cfg, chan, assignment)


def serve_stage(cfg: WorkerConfig, chan: Channel, assignment: Any) -> None:
    """After the handshake: beat, take the stage's weights, serve batches until the channel ends (then return); any
    failure is reported to the gateway and ends the process."""
    try:
        start_heartbeat(chan, cfg.heartbeat_timeout_s / 5)
        worker = _StageWorker(cfg, chan, assignment)
        gc.freeze()  # the model, captures and torch's own objects: no later collection scans them (~0.1 s each)
        worker.serve_forever()
    except BaseException:  # noqa: BLE001 - tell the gateway why, then go
        report_fatal(chan, f"stagewise serve replica {cfg.replica} stage {cfg.stage}")

