"""GenerateBackend: text generation served by a causal LM split into stage-worker processes.

The gateway process holds the scheduler (``_gen_engine``), the tokenizer and the samplers; the workers (``_gen_worker``)
hold the layers and their KV caches. Stage 0 gets each step over its channel; the last stage answers with one logits
row per sequence; the scheduling (which sequences ride in the next step, up to one step per stage in flight) and the
sampling happen here, under one lock, on the thread that reads the last stage's channel or the caller's.

A request is an async iterator of :class:`TokenEvent`; closing it early (a client that disconnects, a cancel) frees the
sequence's KV slot on every stage at once: slots are the scheduler's bookkeeping, so a freed slot is reused by the
next admitted sequence (which overwrites it before reading it). When every slot is taken, requests wait in a bounded
queue; past it they are refused (:class:`TooManyRequestsError`, 429 with Retry-After).

A worker that dies (or breaks its channel) takes its generation of workers down: the others are killed, a new
generation starts, and every running sequence is prefilled again from its tokens so far (prompt + output), as Petals
re-prefills a replacement server; clients keep their streams and see no repeated or missing token.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import secrets
import socket
import statistics
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from ..comm import find_free_port
from ..launch import forkserver_context
from ._channel import Channel, Message
from ._gen_config import GenerateConfig
from ._gen_engine import Scheduler, SeqState, Step
from ._gen_model import (
    ChatTemplate,
    TokenizerMissingError,
    eos_token_ids,
    load_causal_lm,
    load_tokenizer,
    max_positions,
)
from ._gen_sampling import SamplingParams, StopText, choose_token
from ._gen_stage import slots_in_budget
from ._gen_worker import GenWorkerConfig, gen_worker_main
from ._listener import ChannelListener, HelloFields
from ._protocol import BackendError, BadRequestError, ServiceUnavailableError

__all__ = ["GenerateBackend", "TokenEvent", "TooManyRequestsError"]

log = logging.getLogger(__name__)

_PRELOAD = ("torch", "transformers", "stagewise.serve._gen_worker")


class TooManyRequestsError(ServiceUnavailableError):
    """Every KV slot is taken and the queue is full: try again after ``retry_after_s``."""

    status_code = 429


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token (``token`` None on the final event of a stop string) and the text it adds."""

    token: int | None
    text: str
    finish_reason: str | None = None
    """None while running; 'stop' (end-of-sequence, stop token or string) or 'length' on the last event."""


class _Request:
    """The gateway's side of one sequence: its sampler, its text so far, the queue its events go to."""

    def __init__(self, params: SamplingParams, loop: asyncio.AbstractEventLoop, tokenizer: Any) -> None:
        self.params, self.loop, self.tokenizer = params, loop, tokenizer
        self.generator = params.generator()
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.stop_text = StopText(params.stop)
        self.created = time.monotonic()
        self.last_token_at: float | None = None

    def put(self, item: TokenEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class GenerateBackend:
    """Serve ``config.model`` for generation on ``config.stages`` worker processes; see the module doc."""

    def __init__(self, config: GenerateConfig) -> None:
        self.config = config
        lm = load_causal_lm(config.model, seed=config.seed, dtype=config.dtype)
        self.eos = eos_token_ids(lm)
        self.max_len = config.max_len or max_positions(lm)
        self.vocab = int(lm.get_output_embeddings().weight.shape[0])
        self.slots = config.max_seqs
        if config.kv_budget_mb is not None:
            self.slots = slots_in_budget(lm, stages=config.stages, max_len=self.max_len,
                                         budget_bytes=int(config.kv_budget_mb * 2**20))
        del lm
        self.name = config.name or os.path.basename(config.model.rstrip("/")).rpartition(":")[2]
        self.tokenizer = load_tokenizer(config.model, config.tokenizer)
        self.chat = ChatTemplate(config.model, config.tokenizer)
        self._sched = Scheduler(slots=self.slots, inflight=config.inflight or config.stages,
                                max_queue=config.max_queue, max_batch_tokens=config.max_batch_tokens)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        """Set once the first generation of workers is ready, or the service failed for good."""
        self._error: str | None = None
        """Why the service failed for good (the first start failed, or restarts ran out)."""
        self._closed = False
        self._next_id = 0
        self._gen = 1
        """The generation of workers that serves (or is starting); each restart starts the next."""
        self._up = False
        """Every stage of the current generation is ready."""
        self._restart = False
        self.restarts = 0
        """Generations started after the first."""
        self._broken_in_row = 0
        self._conns: dict[int, Channel] = {}
        self._beats: dict[int, float] = {}
        """Last message time per stage of the current generation (workers beat every second)."""
        self._sent_at: dict[int, float] = {}
        """Send time of each step in flight."""
        self._stage_ready: dict[int, dict[str, Any]] = {}
        self._procs: list[Any] = []
        self._to_reap: list[Any] = []
        self.kv_bytes = 0
        self._ttft_s: collections.deque[float] = collections.deque(maxlen=1000)
        self._itl_s: collections.deque[float] = collections.deque(maxlen=10000)
        self._tokens = 0
        self._born = time.monotonic()
        self._secret = secrets.token_hex(16)
        self._ctx = forkserver_context(_PRELOAD)
        self._listener = ChannelListener(config.host, self._secret, self._on_hello, hello_timeout_s=30.0)
        self._threads = config.threads_per_worker or max(1, (os.cpu_count() or 1) // (config.stages + 1))
        self._start()
        self._watchdog = threading.Thread(target=self._watch, name="stagewise-generate-watch", daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------------------------------------------------ public API
    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every stage has its layers and KV cache; ``RuntimeError`` if a worker failed."""
        timeout_s = self.config.startup_timeout_s if timeout_s is None else timeout_s
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"generation workers of {self.name!r} not ready within {timeout_s:g} s: "
                               f"{self._error or 'still loading'}")
        if self._error is not None:
            raise RuntimeError(f"generation workers of {self.name!r} failed: {self._error}")

    def ready(self) -> bool:
        return self._up and self._error is None and not self._closed

    def stats(self) -> dict[str, Any]:
        """KV-cache use (slots, bytes on all stages), requests waiting, steps in flight, tokens generated and their
        rate since start, time to first token and inter-token latency (p50 of the last 1000 / 10000, ms)."""

        def p50_ms(values: collections.deque[float]) -> float | None:
            return 1000 * statistics.median(values) if values else None

        with self._lock:
            return {"slots": self._sched.slots, "slots_used": self._sched.used_slots,
                    "kv_cache_use": self._sched.used_slots / self._sched.slots, "kv_bytes": self.kv_bytes,
                    "waiting": len(self._sched.waiting), "steps_inflight": len(self._sched.inflight),
                    "tokens": self._tokens, "tokens_per_s": self._tokens / (time.monotonic() - self._born),
                    "ttft_p50_ms": p50_ms(self._ttft_s), "itl_p50_ms": p50_ms(self._itl_s),
                    "restarts": self.restarts}

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerMissingError(f"model {self.name!r} has no tokenizer.json; send token ids, or give one "
                                        "(GenerateConfig.tokenizer)")
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Tokens for ``prompt`` as they come; closing the iterator early cancels the sequence (frees its slot)."""
        if not prompt:
            raise BadRequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab for t in prompt):
            raise BadRequestError(f"prompt token ids must be in [0, {self.vocab})")
        if len(prompt) >= self.max_len:
            raise BadRequestError(f"prompt of {len(prompt)} tokens; this service holds {self.max_len} tokens per "
                                  "sequence (GenerateConfig.max_len)")
        if self._error is not None or self._closed:  # a restarting pipeline queues requests
            raise ServiceUnavailableError(f"model {self.name!r} is not serving: {self._error or 'closed'}")
        req = _Request(params, asyncio.get_running_loop(), self.tokenizer)
        with self._lock:
            if not self._sched.can_queue():
                raise TooManyRequestsError(f"model {self.name!r}: all {self._sched.slots} sequences busy and "
                                           f"{self._sched.max_queue} waiting (GenerateConfig.max_queue)",
                                           retry_after_s=1)
            seq = SeqState(self._next_id, list(prompt), len(prompt), owner=req)
            self._next_id += 1
            self._sched.add(seq)
            self._pump()
        finished = False
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                with self._lock:
                    self._sched.release(seq)
                    self._pump()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            seqs = self._sched.fail_all()
        for seq in seqs:
            seq.owner.put(ServiceUnavailableError(f"model {self.name!r} is shutting down"))
        with self._lock:
            self._drop_workers()
            procs, self._to_reap = self._to_reap, []
        self._listener.close()
        for p in procs:
            p.join(5.0)

    # ------------------------------------------------------------------------------------------------ scheduling
    def _pump(self) -> None:
        """Send every step the scheduler allows now; lock held."""
        while self._up and not self._closed and (step := self._sched.next_step()) is not None:
            meta, ids = step.table()
            self._sent_at[step.number] = time.monotonic()
            try:
                self._conns[0].send({"kind": "step", "step": step.number},
                                    {"meta": torch.tensor(meta, dtype=torch.long),
                                     "ids": torch.tensor(ids, dtype=torch.long)})
            except (OSError, KeyError) as exc:
                self._broken(self._gen, f"sending step {step.number} to stage 0 failed: {exc}")
                return

    def _on_logits(self, gen: int, number: int, logits: torch.Tensor) -> None:
        with self._lock:
            if gen != self._gen or number not in self._sched.inflight:
                return
            self._sent_at.pop(number, None)
            step: Step = self._sched.finish_step(number)
            for i, (seq, _start, _new) in enumerate(step.rows):
                if seq.done or seq.cached < len(seq.tokens):  # cancelled, or a prefill chunk with more to come
                    continue
                self._advance(seq, logits[i])
            self._pump()

    def _advance(self, seq: SeqState, logits: torch.Tensor) -> None:
        """Sample ``seq``'s next token, emit it, and end the sequence if it stops; lock held."""
        req: _Request = seq.owner
        params = req.params
        token = choose_token(logits, params, req.generator)
        seq.tokens.append(token)
        now = time.monotonic()
        if req.last_token_at is None:
            self._ttft_s.append(now - req.created)
        else:
            self._itl_s.append(now - req.last_token_at)
        req.last_token_at = now
        self._tokens += 1
        out = seq.output
        reason = None
        if (token in self.eos and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        elif len(out) >= params.max_tokens or len(seq.tokens) >= self.max_len:
            reason = "length"
        text = ""
        if req.tokenizer is not None:
            text = req.stop_text.advance(self.decode(out), final=reason is not None)
            if req.stop_text.stopped:
                reason = "stop"
        req.put(TokenEvent(token, text, reason))
        if reason is not None:
            self._sched.release(seq)
        self._broken_in_row = 0  # a token came back: the pipeline works

    def _fail_for_good(self, reason: str) -> None:
        """Fail every request and refuse new ones; lock held."""
        if self._error is None:
            self._error = reason
            log.error("generation pipeline of %s failed: %s", self.name, reason)
        for seq in self._sched.fail_all():
            seq.owner.put(BackendError(f"model {self.name!r}: {reason}"))
        self._drop_workers()
        self._ready.set()

    def _broken(self, gen: int, reason: str) -> None:
        """A worker of generation ``gen`` died or broke its channel; lock held.

        Before the first generation is ready that is fatal (the model does not load). After it, every worker of the
        generation is killed, the sequences in flight go back to the front of the queue with their tokens so far
        (prompt + output: the next generation prefills them again, and their clients' streams go on), and a new
        generation starts; ``GenerateConfig.max_restarts`` in a row without a finished step fail the service.
        """
        if gen != self._gen or self._closed or self._error is not None:
            return
        if not self._ready.is_set():
            self._fail_for_good(f"{reason} (while starting)")
            return
        if self._broken_in_row >= self.config.max_restarts:
            self._fail_for_good(f"{reason}; restarted {self._broken_in_row} times without a token in between "
                                "(GenerateConfig.max_restarts)")
            return
        self._broken_in_row += 1
        self.restarts += 1
        log.warning("generation pipeline of %s broke (%s): restarting it; %d sequences are prefilled again",
                    self.name, reason, len(self._sched.running))
        self._drop_workers()
        self._sched.requeue_all()
        self._gen += 1  # what the dead generation's workers still say is ignored from now on
        self._restart = True

    def _drop_workers(self) -> None:
        """Kill the current generation's workers and close their channels; lock held."""
        self._up = False
        for chan in self._conns.values():
            chan.close()
        self._conns, self._stage_ready, self._beats, self._sent_at = {}, {}, {}, {}
        for p in self._procs:
            if p.exitcode is None:
                p.kill()
        self._to_reap.extend(self._procs)
        self._procs = []

    def _start(self) -> None:
        """Start a new generation of workers (its own gloo port)."""
        config = self.config
        with self._lock:
            self._restart = False
            gen = self._gen
            self._started_at = time.monotonic()
        port = find_free_port("127.0.0.1")
        procs = []
        for s in range(config.stages):
            wc = GenWorkerConfig(model=config.model, stage=s, stages=config.stages, slots=self.slots,
                                 max_len=self.max_len, seed=config.seed, dtype=config.dtype, threads=self._threads,
                                 gateway_host=config.host, gateway_port=self._listener.port, secret=self._secret,
                                 dist_port=port, generation=gen, timeout_s=config.worker_timeout_s,
                                 log_level=log.getEffectiveLevel())
            p = self._ctx.Process(target=gen_worker_main, args=(wc.to_json(),), daemon=True,
                                  name=f"stagewise-generate-g{gen}s{s}")
            p.start()
            procs.append(p)
        with self._lock:
            if gen == self._gen and not self._closed:
                self._procs = procs
            else:
                for p in procs:
                    p.kill()
                self._to_reap.extend(procs)

    # ------------------------------------------------------------------------------------------------ channels
    def _on_hello(self, sock: socket.socket, who: HelloFields) -> None:
        chan = Channel(sock, send_timeout_s=self.config.worker_timeout_s)
        with self._lock:
            if (who.generation != self._gen or who.stage >= self.config.stages or who.stage in self._conns
                    or self._closed):
                chan.close()
                return
            self._conns[who.stage], self._beats[who.stage] = chan, time.monotonic()
        threading.Thread(target=self._read, args=(who.stage, who.generation, chan), daemon=True,
                         name=f"stagewise-generate-g{who.generation}s{who.stage}").start()

    def _read(self, stage: int, gen: int, chan: Channel) -> None:
        reason = f"stage {stage} closed its channel"
        try:
            while (msg := chan.recv()) is not None:
                self._on_message(stage, gen, msg)
        except Exception as exc:  # noqa: BLE001 - any broken channel breaks the pipeline
            reason = f"stage {stage} channel broke: {type(exc).__name__}: {exc}"
        with self._lock:
            self._broken(gen, reason)
        chan.close()

    def _on_message(self, stage: int, gen: int, msg: Message) -> None:
        kind, h = msg.kind, msg.header
        if gen == self._gen:
            self._beats[stage] = time.monotonic()  # every message is a heartbeat
        if kind == "logits":
            self._on_logits(gen, int(h["step"]), msg.tensors["logits"])
            return
        with self._lock:
            if gen != self._gen:
                return
            if kind == "ready":
                self._stage_ready[stage] = h
                self.kv_bytes = sum(int(r["kv_bytes"]) for r in self._stage_ready.values())
                if len(self._stage_ready) == self.config.stages:
                    log.info("generation pipeline of %s ready (generation %d): %d slots x %d tokens, %.1f MiB of KV "
                             "cache", self.name, gen, self._sched.slots, self.max_len, self.kv_bytes / 2**20)
                    self._up = True
                    self._ready.set()
                    self._pump()
            elif kind == "fatal":
                self._broken(gen, f"stage {stage} crashed: {str(h.get('message', ''))[-800:]}")

    def _watch(self) -> None:
        """Breaks the pipeline when a worker process exits or a start takes too long; starts the next generation."""
        while not self._closed and self._error is None:
            with self._lock:
                gen, procs, restart = self._gen, list(self._procs), self._restart
                dead = [s for s, p in enumerate(procs) if p.exitcode is not None]
                if dead:
                    self._broken(gen, f"stage {dead[0]} process exited with code {procs[dead[0]].exitcode}")
                elif not self._up and procs and time.monotonic() - self._started_at > self.config.startup_timeout_s:
                    self._broken(gen, f"not ready within {self.config.startup_timeout_s:g} s "
                                      "(GenerateConfig.startup_timeout_s)")
                elif silent := [s for s, t in self._beats.items()
                                if self._up and time.monotonic() - t > self.config.heartbeat_timeout_s]:
                    self._broken(gen, f"stage {silent[0]} silent for {self.config.heartbeat_timeout_s:g} s "
                                      "(GenerateConfig.heartbeat_timeout_s): stopped or hung")
                elif stuck := [n for n, t in self._sent_at.items()
                               if time.monotonic() - t > self.config.worker_timeout_s]:
                    self._broken(gen, f"step {stuck[0]} not answered within {self.config.worker_timeout_s:g} s "
                                      "(GenerateConfig.worker_timeout_s): a stage is stuck")
                gone = [p for p in self._to_reap if p.exitcode is not None]
                self._to_reap = [p for p in self._to_reap if p.exitcode is None]
            for p in gone:
                p.close()
            if restart:
                self._start()
            time.sleep(0.1)
