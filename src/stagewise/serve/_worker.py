"""One stage-worker process of a serving pipeline replica, and the model preparation it shares with the gateway.

A worker connects to the gateway's channel (hello), loads the model, splits it exactly as the gateway did, keeps its
own stage, joins its replica's own gloo group (rank = stage), and reports ready with a digest of its stage's weights
(the gateway checks it against its own: a factory that builds different weights in different processes is caught).

Then batch after batch, in sequence: stage 0 takes a ``run`` message (seq, rows, every model input) from its channel; a
later stage receives from the stage before it (DistTransport, tag = seq mod 2**20) the batch's row count, the stage
times so far, the model inputs that it or a later stage reads, and its activations. Each stage runs and sends on; the
last one answers the gateway over its channel. Only stage 0 hears from the gateway per batch: a later stage is woken
once, when its input arrives (on a small machine, waking every stage at dispatch costs the first stage its core).

Batch sizes: graphs are captured with static shapes, so a batch of ``n`` rows is padded (repeating its last row) to the
next power of two (at most ``max_batch_size``) and the outputs are cut back to ``n`` rows. That bounds the captures per
worker to ``log2(max_batch_size) + 1``, each made on first use. It is exact for models whose rows do not interact in
eval mode (no cross-row ops); padded rows are never returned.

Stage 0 exits when its channel reaches EOF (the gateway closed it, or died); a later stage exits when the stage before
it does (its wait breaks): no worker outlives its gateway.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from .._allocator import tune_allocator
from .._spec import ModelSpec, load_model_spec
from ..comm import CommError, DistTransport, SendHandle
from ..split import SplitModel, Stage, split
from ..split._capture import input_leaves
from ..split._tree import unflatten
from ._backend import ModelMetadata, TensorMetadata
from ._channel import Channel
from ._protocol import datatype_of

__all__ = ["WorkerConfig", "ServingSplit", "load_serving_split", "describe_serving", "bucket_rows", "pad_rows",
           "worker_main"]

log = logging.getLogger(__name__)

TAG_SPACE = 1 << 20
"""Activation tags are ``seq % TAG_SPACE``."""
_IDLE_WAIT_S = 10.0 * 365 * 24 * 3600
"""How long a later stage waits for its next batch: as long as the service idles (see ``serve_forever``)."""


@dataclasses.dataclass(kw_only=True)
class WorkerConfig:
    """Everything one worker needs; travels to the process as JSON."""

    model: str
    """MODEL factory string."""
    stages: int
    """Stages per replica (the gloo group size)."""
    stage: int
    """This worker's stage (its rank in the replica's group)."""
    replica: int
    """Replica index."""
    generation: int
    """Start count of this replica; the gateway ignores workers of older generations."""
    gateway_host: str
    """Where the gateway's channel listens."""
    gateway_port: int
    """Port of the gateway's channel."""
    secret: str
    """Shared secret sent in the hello, so stray local connections are refused."""
    dist_port: int
    """Free port of this replica's gloo rendezvous (stage 0 listens)."""
    max_batch_size: int
    """Largest batch the gateway sends."""
    exclude_inputs: list[str]
    """Keyword example inputs dropped before capture (e.g. ``labels``)."""
    seed: int
    """torch seed set before calling the factory."""
    threads: int
    """torch intra-op threads."""
    timeout_s: float
    """Deadline of every gloo wait (and of the rendezvous)."""
    precapture: bool = False
    """Capture every batch-size bucket before reporting ready (else each on first use)."""
    checkpoint: str | None = None
    """A training checkpoint whose weights (by FQN) replace the factory's."""
    cuts: list[str] | None = None
    """Cut before these units (from a plan) instead of balancing."""
    tasks: list[str] | None = None
    """Task split: the head FQNs; ``head`` picks the one this service runs after the trunk."""
    head: str | None = None
    """The task head served (the trunk is cut into ``stages - 1`` stages, then this head)."""
    submodule: str | None = None
    """Serve only this sub-module (by FQN), on the inputs it receives in the example call."""
    log_level: int = logging.WARNING
    """Logging level of the worker process (the gateway's effective level)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))


@dataclasses.dataclass
class ServingSplit:
    """A model split for serving, with the example call that fixes every non-batch dimension."""

    sm: SplitModel
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str
    """The factory's model name."""
    chain: list[int] = dataclasses.field(default_factory=list)
    """Indices of the stages this service runs, in order (all of them; or a task split's trunk plus one head)."""

    def chain_stages(self, stages: Sequence[Stage]) -> list[Stage]:
        return [stages[i] for i in self.chain]

    @property
    def input_names(self) -> list[str]:
        """The served inputs' names, in metadata order."""
        return list(input_leaves(self.args, self.kwargs)[1])

    @property
    def example_rows(self) -> int:
        leaves, _, _ = input_leaves(self.args, self.kwargs)
        return int(leaves[0].shape[0])

    def example_call(self, rows: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The example inputs with ``rows`` rows (example rows repeated): what a capture for that batch size needs."""
        leaves, _, spec = input_leaves(self.args, self.kwargs)
        idx = torch.arange(rows) % leaves[0].shape[0]
        args, kwargs = unflatten(spec, [t[idx] for t in leaves])
        return tuple(args), dict(kwargs)


def load_serving_split(model: str, *, stages: int, exclude_inputs: Sequence[str] = ("labels",),
                       seed: int = 0, checkpoint: str | None = None, cuts: Sequence[str] | None = None,
                       tasks: Sequence[str] | None = None, head: str | None = None,
                       submodule: str | None = None) -> ServingSplit:
    """Build MODEL (under ``seed``), load ``checkpoint``'s weights if given, put it in eval mode and split it into a
    chain of ``stages`` stages (at ``cuts`` when given). With ``tasks`` and ``head``: a task split whose trunk takes
    ``stages - 1`` stages, followed by the stage of ``head`` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spec = load_model_spec(model)
    if checkpoint is not None:
        load_checkpoint_weights(spec.model, checkpoint)
    spec.model.eval()
    if submodule is not None:
        spec = _submodule_spec(spec, submodule)
    kwargs = {k: v for k, v in spec.kwargs.items() if k not in set(exclude_inputs)}
    leaves, names, _ = input_leaves(spec.args, kwargs)
    if not leaves:
        raise ValueError(f"model {model!r} has no tensor inputs to serve")
    rows = {int(t.shape[0]) if t.dim() else 0 for t in leaves}
    if len(rows) != 1 or 0 in rows:
        raise ValueError(f"every example input of {model!r} needs the batch on dim 0 with the same size; got "
                         f"{dict(zip(names, (list(t.shape) for t in leaves)))}")
    if head is not None:
        if not tasks or head not in tasks:
            raise ValueError(f"head {head!r} is not one of the task heads {list(tasks or [])}")
        if stages < 2:
            raise ValueError("serving a task head needs at least 2 stages: the trunk and the head")
        sm = split(spec.model, spec.args, kwargs, stages=stages - 1, tasks=list(tasks), model_name=model)
        chain = [st.index for st in sm.stages if st.spec.head is None]
        chain += [st.index for st in sm.stages if st.spec.head == head]
    else:
        sm = split(spec.model, spec.args, kwargs, stages=stages, cuts=list(cuts) if cuts else None, model_name=model)
        if sm.partition.mode == "tasks":
            raise ValueError("a task split serves one head per model name: give the head")
        chain = [st.index for st in sm.stages]
    for pos, i in enumerate(chain):
        st = sm.stages[i]
        if st.spec.parent != (chain[pos - 1] if pos else None):
            raise ValueError(f"stage {st.index} receives from stage {st.spec.parent}; serving needs a chain")
        if st.spec.outputs and pos != len(chain) - 1:
            raise ValueError(f"stage {st.index} returns model outputs {st.spec.outputs}; serving needs them all from "
                             "the last stage")
    return ServingSplit(sm=sm, args=tuple(spec.args), kwargs=kwargs, name=spec.name if head is None else
                        f"{spec.name}.{head}", chain=chain)


def _submodule_spec(spec: ModelSpec, fqn: str) -> ModelSpec:
    """A sub-model as a model of its own: the module at ``fqn`` with the inputs it gets in the example call."""
    try:
        module = spec.model.get_submodule(fqn)
    except AttributeError:
        names = [n for n, _ in spec.model.named_children()]
        raise ValueError(f"{type(spec.model).__name__} has no sub-module {fqn!r}; its children are {names}") from None
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    handle = module.register_forward_pre_hook(lambda _m, a, k: seen.append((a, k)) if not seen else None,
                                              with_kwargs=True)
    try:
        with torch.no_grad():
            spec.model(*spec.args, **spec.kwargs)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"sub-module {fqn!r} is never called by the model's forward on its example inputs")
    args, kwargs = seen[0]
    return ModelSpec(model=module, args=tuple(args), kwargs=dict(kwargs), name=f"{spec.name}.{fqn}")


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """Copy every weight of ``model`` from a training checkpoint (by FQN, from whatever layout saved it)."""
    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, verify="read")
    state = model.state_dict()
    saved = ckpt.tensors(list(state))
    missing = [k for k in state if k not in saved]
    if missing:
        raise ValueError(f"checkpoint {checkpoint} has no weights for {missing[:5]}; was it saved from this model?")
    model.load_state_dict(saved, strict=True)


def checkpoint_model(checkpoint: str) -> str:
    """The MODEL factory string a training checkpoint was made from (its manifest records the run's config)."""
    from ..checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, verify="size").extra.get("config", {}).get("model")
    if not model:
        raise ValueError(f"checkpoint {checkpoint} does not record its model; pass MODEL and --checkpoint DIR")
    return str(model)


def describe_serving(serving: ServingSplit, name: str) -> tuple[ModelMetadata, list[str]]:
    """Metadata (inputs/outputs by leaf name, dtypes from one in-process run) and each stage's weight digest."""
    leaves, names, _ = input_leaves(serving.args, serving.kwargs)
    example = dict(zip(names, leaves))
    stages = serving.chain_stages(serving.sm.stages)
    outputs: list[Any] = [None] * len(serving.sm.partition.output_names)
    recv: list[Any] = []
    with torch.inference_mode():
        for pos, st in enumerate(stages):
            send, outs = st(recv, example)
            by_name = {v.name: x for v, x in zip(st.spec.send, send)}
            if pos + 1 < len(stages):
                recv = [by_name[v.name] for v in stages[pos + 1].spec.recv]
            for leaf, value in zip(st.output_index, outs):
                outputs[leaf] = value
    rows = serving.example_rows
    out_meta = []
    served = set(stages[-1].spec.outputs)
    for leaf_name, value in zip(serving.sm.partition.output_names, outputs):
        if leaf_name not in served:  # another task head's output
            continue
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"model output {leaf_name!r} is {shape}: every served output needs the batch on dim 0 "
                             f"({rows} rows for the example inputs); drop loss-only inputs with exclude_inputs")
        out_meta.append(TensorMetadata(name=leaf_name, datatype=datatype_of(value), shape=(-1, *value.shape[1:])))
    meta = ModelMetadata(
        name=name, outputs=tuple(out_meta),
        inputs=tuple(TensorMetadata(name=n, datatype=datatype_of(t), shape=(-1, *t.shape[1:]))
                     for n, t in example.items()))
    return meta, [stage_digest(st) for st in stages]


def bucket_rows(rows: int, max_batch_size: int) -> int:
    """The captured batch size that serves ``rows`` rows: the next power of two, at most ``max_batch_size``."""
    assert 0 < rows <= max_batch_size, (rows, max_batch_size)
    return min(1 << (rows - 1).bit_length(), max_batch_size)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its last row repeated up to ``rows`` rows."""
    extra = rows - t.shape[0]
    if extra <= 0:
        return t
    return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])], dim=0)


def stage_digest(stage: Stage) -> str:
    """SHA-256 over the weights the stage owns and its constants (names, dtypes, shapes, bytes), to check that every
    process built the same ones."""
    h = hashlib.sha256()
    owned = set(stage.spec.params)
    state = dict(stage.module.named_parameters(remove_duplicate=False))
    state.update(dict(stage.module.named_buffers(remove_duplicate=False)))
    for name in sorted(n for n in state if n in owned or n.startswith("_stagewise_const")):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(state[name].shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _StageWorker:
    def __init__(self, cfg: WorkerConfig, chan: Channel) -> None:
        self.cfg, self.chan = cfg, chan
        self.last = cfg.stage == cfg.stages - 1
        t0 = time.perf_counter()
        self.serving = load_serving_split(cfg.model, stages=cfg.stages, exclude_inputs=cfg.exclude_inputs,
                                          seed=cfg.seed, checkpoint=cfg.checkpoint, cuts=cfg.cuts, tasks=cfg.tasks,
                                          head=cfg.head, submodule=cfg.submodule)
        self.digest = stage_digest(self.serving.chain_stages(self.serving.sm.stages)[cfg.stage])
        # batch rows -> (this stage, names of the values the next stage receives, in its order)
        self._stages: dict[int, tuple[Stage, list[str]]] = {}
        if self.serving.example_rows <= cfg.max_batch_size:
            self._stages[self.serving.example_rows] = self._mine(self.serving.sm.stages)
        t1 = time.perf_counter()
        self.transport: DistTransport | None = None
        if cfg.stages > 1:
            self.transport = DistTransport.init(rank=cfg.stage, world_size=cfg.stages, master_port=cfg.dist_port,
                                                timeout=cfg.timeout_s)
        if cfg.precapture:
            rows = 1
            while rows < cfg.max_batch_size:
                self.stage_for(rows)
                rows *= 2
            self.stage_for(cfg.max_batch_size)
        log.info("replica %s stage %s: model split in %.2f s, rendezvous and captures in %.2f s", cfg.replica,
                 cfg.stage, t1 - t0, time.perf_counter() - t1)
        self._sends: collections.deque[SendHandle] = collections.deque()
        # Model inputs read by the stages after this one travel with the activations (the gateway sends every input
        # to stage 0 only), in the metadata's input order: what this stage receives, and what it passes on.
        chain = self.serving.chain_stages(self.serving.sm.stages)
        names = self.serving.input_names
        self.forwarded = [n for n in names if any(n in st.spec.inputs for st in chain[cfg.stage:])]
        self.forwarded_next = [n for n in names if any(n in st.spec.inputs for st in chain[cfg.stage + 1:])]

    def _mine(self, stages: list[Stage]) -> tuple[Stage, list[str]]:
        chain = self.serving.chain_stages(stages)
        s = self.cfg.stage
        return chain[s], [] if self.last else [v.name for v in chain[s + 1].spec.recv]

    def stage_for(self, rows: int) -> tuple[Stage, list[str]]:
        """This stage captured for ``rows`` rows (captured now if it is the first such batch)."""
        found = self._stages.get(rows)
        if found is None:
            t0 = time.perf_counter()
            _, stages = self.serving.sm.stages_for(*self.serving.example_call(rows))
            found = self._stages[rows] = self._mine(stages)
            log.info("replica %s stage %s: captured batch size %s in %.2f s", self.cfg.replica, self.cfg.stage, rows,
                     time.perf_counter() - t0)
        return found

    def serve_forever(self) -> None:
        """Run batches in order until the gateway goes away, then exit the process.

        Stage 0 reads each batch from its channel, on this thread (a reader thread would cost a thread hand-off per
        batch; the gateway's sends never block on us); EOF (gateway gone or closing) ends the process. A later stage
        waits only on the stage before it, for the next batch in sequence: the gateway announces nothing to it, so it
        is not woken for a batch until its input is there. It may wait as long as the service idles; a peer that dies
        breaks the wait at once, and the gateway fails a replica whose batch stays in flight too long.
        """
        cfg = self.cfg
        self.chan.send({"kind": "ready", "stage": cfg.stage, "digest": self.digest})
        if cfg.stage > 0:
            seq = 0
            while True:
                try:
                    batch = self._receive(seq)
                except CommError as exc:  # the stage before exited (shutdown, or its crash the gateway sees itself)
                    log.debug("replica %s stage %s: stage before is gone: %s", cfg.replica, cfg.stage, exc)
                    os._exit(0)
                self.run_one(*batch)
                seq += 1
        try:
            while (msg := self.chan.recv()) is not None:
                if msg.kind == "run":
                    self.run_one(int(msg.header["seq"]), int(msg.header["rows"]), True, [], msg.tensors, [])
                else:
                    log.warning("replica %s stage 0: ignoring message kind %r", cfg.replica, msg.kind)
        except OSError as exc:  # any broken channel means the gateway is gone (ChannelError is an OSError)
            log.debug("replica %s stage 0: channel broke: %s", cfg.replica, exc)
        os._exit(0)

    def _receive(self, seq: int) -> tuple[int, int, bool, list[float], dict[str, torch.Tensor], list[Any]]:
        """Batch ``seq`` from the stage before: ``[ok, rows, n_times, *times, n_inputs, *model inputs (name order),
        *values this stage receives]``."""
        assert self.transport is not None
        values = self.transport.recv(src=self.cfg.stage - 1, tag=seq % TAG_SPACE, timeout=_IDLE_WAIT_S)
        ok, rows, n = values[0] == 0, int(values[1]), int(values[2])  # type: ignore[arg-type]
        times = [float(t) for t in values[3:3 + n]]  # type: ignore[arg-type]
        k = int(values[3 + n])  # type: ignore[arg-type]
        inputs = dict(zip(self.forwarded, values[4 + n:4 + n + k]))
        return seq, rows, ok, times, inputs, values[4 + n + k:]  # type: ignore[return-value]

    def run_one(self, seq: int, rows: int, ok: bool, times: list[float], inputs: dict[str, torch.Tensor],
                recv: list[Any]) -> None:
        """Run batch ``seq`` (unless a stage before failed it: ``ok`` False) and pass it on."""
        cfg = self.cfg
        send: list[Any] = []
        result: dict[str, torch.Tensor] = {}
        if ok:
            try:
                if not 0 < rows <= cfg.max_batch_size:
                    raise ValueError(f"batch of {rows} rows; this pipeline takes 1..{cfg.max_batch_size}")
                padded = bucket_rows(rows, cfg.max_batch_size)
                stage, next_names = self.stage_for(padded)
                t0 = time.perf_counter()
                mine = {n: pad_rows(inputs[n], padded) for n in stage.spec.inputs}
                with torch.inference_mode():
                    sent, outs = stage(recv, mine)
                times.append(time.perf_counter() - t0)
                by_name = {v.name: x for v, x in zip(stage.spec.send, sent)}
                send = [by_name[n] for n in next_names]  # what the next stage receives, in its order
                if self.last:
                    result = {name: out[:rows] for name, out in zip(stage.spec.outputs, outs)}
            except Exception as exc:  # noqa: BLE001 - one bad batch fails that batch, not the worker
                ok = False
                log.exception("replica %s stage %s failed on batch %s", cfg.replica, cfg.stage, seq)
                self.chan.send({"kind": "error", "seq": seq, "stage": cfg.stage,
                                "message": f"{type(exc).__name__}: {exc}"})
        if not self.last:  # always sent, failed or not: the next stage expects every batch in sequence
            assert self.transport is not None
            later = [inputs[n] for n in self.forwarded_next] if ok else []
            payload = [0 if ok else 1, rows, len(times), *times, len(later), *later, *(send if ok else [])]
            self._sends.append(self.transport.isend(payload, dst=cfg.stage + 1, tag=seq % TAG_SPACE))
            while len(self._sends) > 2:  # bounded: the next stage takes them in order
                self._sends.popleft().wait(cfg.timeout_s)
        elif ok:
            self.chan.send({"kind": "result", "seq": seq, "times": times}, result)


def worker_main(config_json: str) -> None:
    """Process entry point (module level, so the forkserver can start it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the gateway, which then closes our channel
    cfg = WorkerConfig.from_json(config_json)
    logging.basicConfig(level=cfg.log_level, format=f"%(asctime)s %(levelname)s [replica {cfg.replica} stage "
                                                      f"{cfg.stage}] %(name)s: %(message)s")
    tune_allocator()
    torch.set_num_threads(cfg.threads)
    sock = socket.create_connection((cfg.gateway_host, cfg.gateway_port), timeout=30.0)
    sock.settimeout(None)
    chan = Channel(sock, send_timeout_s=cfg.timeout_s)
    try:
        chan.send({"kind": "hello", "replica": cfg.replica, "generation": cfg.generation, "stage": cfg.stage,
                   "secret": cfg.secret, "pid": os.getpid()})
        worker = _StageWorker(cfg, chan)
        gc.freeze()  # the model, captures and torch's own objects: no later collection scans them (~0.1 s each)
        worker.serve_forever()
    except BaseException:  # noqa: BLE001 - tell the gateway why, then go
        text = traceback.format_exc()
        sys.stderr.write(f"[stagewise serve replica {cfg.replica} stage {cfg.stage}] {text}")
        sys.stderr.flush()
        try:
            chan.send({"kind": "fatal", "message": text[-4000:]})
        except OSError:
            pass
        os._exit(1)
