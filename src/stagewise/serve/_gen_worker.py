"""One stage-worker process of a generation pipeline.

A worker connects to the gateway's channel (the authenticated hello of ``_listener``), builds MODEL, keeps only its
stage (:class:`~._gen_stage.GenStage`: its decoder layers, their preallocated KV cache, the embeddings on stage 0 and
the head on the last), allocates the cache with a warm-up step, joins the stages' gloo group (rank = stage) and reports
``ready {stage, kv_bytes}``.

Then step after step, in order. A step is a table of rows ``(slot, start, q_len)`` (decode rows, ``q_len`` 1, first;
then prefill rows) and the rows' new token ids, flattened in row order. Stage 0 reads ``step {step}`` messages
(tensors ``meta`` and ``ids``) from its channel; a later stage receives ``[step, meta, ids, hidden]`` from the stage
before (DistTransport, tag = step mod 2**20). Each stage runs its rows (``GenStage.run_rows``: decode rows as one
batch, fresh prefills as another) and sends its hidden states on; the last answers ``logits {step}`` (one row of
next-token logits per row) over its channel. Any exception is fatal: the worker reports it (``fatal``) and exits, and
the gateway restarts the workers and re-runs the sequences (see ``_gen_backend``).

Stage 0 exits on its channel's EOF; a later stage when the stage before it goes away.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import socket

import torch

from ..comm import CommError, DistTransport, SendHandle
from ._channel import Channel, report_fatal, start_heartbeat
from ._gen_model import load_causal_lm
from ._gen_stage import GenStage
from ._listener import HelloFields, client_handshake

__all__ = ["GenWorkerConfig", "gen_worker_main"]

log = logging.getLogger(__name__)

TAG_SPACE = 1 << 20
_IDLE_WAIT_S = 10.0 * 365 * 24 * 3600
"""How long a later stage waits for its next step: as long as the service idles."""
_BEAT_S = 1.0


@dataclasses.dataclass(kw_only=True, slots=True)
class GenWorkerConfig:
    """What one worker needs, sent to the process as JSON."""

    model: str
    stage: int
    stages: int
    slots: int
    max_len: int
    seed: int
    dtype: str
    threads: int
    gateway_host: str
    gateway_port: int
    secret: str
    dist_port: int
    generation: int
    timeout_s: float
    log_level: int = logging.WARNING

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GenWorkerConfig:
        return cls(**json.loads(text))



def _serve(cfg: GenWorkerConfig, chan: Channel) -> None:
    stage = GenStage(load_causal_lm(cfg.model, seed=cfg.seed, dtype=cfg.dtype), stage=cfg.stage, stages=cfg.stages,
                     slots=cfg.slots, max_len=cfg.max_len)
    kv_bytes = stage.warm_up()
    transport = None
    if cfg.stages > 1:
        transport = DistTransport.init(rank=cfg.stage, world_size=cfg.stages, master_port=cfg.dist_port,
                                       timeout=cfg.timeout_s)
    chan.send({"kind": "ready", "stage": cfg.stage, "kv_bytes": kv_bytes, "layers": list(stage.layer_range)})
    sends: collections.deque[SendHandle] = collections.deque()
    step_no = 0
    while True:
        if cfg.stage == 0:
            msg = chan.recv()
            if msg is None:
                return
            if msg.kind != "step":
                continue
            step_no = int(msg.header["step"])
            meta, ids, hidden = msg.tensors["meta"], msg.tensors["ids"], None
        else:
            assert transport is not None
            values = transport.recv(src=cfg.stage - 1, tag=step_no % TAG_SPACE, timeout=_IDLE_WAIT_S)
            step_no, meta, ids, hidden = int(values[0]), values[1], values[2], values[3]  # type: ignore[arg-type]
        out = stage.run_rows(meta, ids, hidden)  # type: ignore[arg-type]
        if stage.last:
            chan.send({"kind": "logits", "step": step_no}, {"logits": out})
        else:
            assert transport is not None
            sends.append(transport.isend([step_no, meta, ids, out], dst=cfg.stage + 1, tag=step_no % TAG_SPACE))
            while len(sends) > 2:
                sends.popleft().wait(cfg.timeout_s)
        step_no += 1


def gen_worker_main(config_json: str) -> None:
    """Process entry point (module level, so the forkserver can start it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the gateway, which then closes our channel
    cfg = GenWorkerConfig.from_json(config_json)
    logging.basicConfig(level=cfg.log_level,
                        format=f"%(asctime)s %(levelname)s [generate stage {cfg.stage}] %(name)s: %(message)s")
    torch.set_num_threads(cfg.threads)
    sock = socket.create_connection((cfg.gateway_host, cfg.gateway_port), timeout=30.0)
    chan = Channel(sock, send_timeout_s=cfg.timeout_s)
    try:
        client_handshake(chan, cfg.secret, HelloFields(replica=0, generation=cfg.generation, stage=cfg.stage,
                                                       pid=os.getpid()), timeout_s=30.0)
        start_heartbeat(chan, _BEAT_S)
        _serve(cfg, chan)
    except (CommError, OSError) as exc:  # a neighbour or the gateway went away: shutdown, or a crash it sees itself
        log.debug("generate stage %s: %s", cfg.stage, exc)
    except BaseException:  # noqa: BLE001 - tell the gateway why, then go
        report_fatal(chan, f"stagewise generate stage {cfg.stage}")
    os._exit(0)
