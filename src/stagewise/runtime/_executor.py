"""Interpret a schedule on one rank: run the stages this rank holds, move activations and gradients, record a timeline.

Stage ``s`` of the pipeline lives on pipeline position ``s % P``; ``peers[p]`` is the global rank at position ``p``.
What crosses a boundary is exactly ``StageSpec.send``/``recv``. Backward sends the gradients of the received tensors
that required grad, in order; the sender expects gradients for its sent tensors that required grad, in the same order
(the ``requires_grad`` flag travels with each tensor, so both sides agree).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .._errors import StagewiseError
from ..comm import CommTimeoutError, SendHandle, Transport
from ..schedule import Action, Schedule
from ..split import Stage
from ._forward import run_forward

__all__ = ["PipelineExecutor", "StepError", "TimelineEvent"]

log = logging.getLogger(__name__)

LossFn = Callable[[list[Any], int], torch.Tensor]
"""``loss(outputs, microbatch) -> scalar``: the last stage's model outputs (leaf order) for one microbatch."""


class StepError(StagewiseError, RuntimeError):
    """A schedule action failed; the message names rank, stage, action and microbatch and shows the schedule grid.

    When the action timed out waiting for another rank, the message starts with that rank and its stage (the one that
    stopped or hung), and :attr:`peer` holds its rank.
    """

    def __init__(self, message: str, *, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


_PEER_STAGE = {"RECV_F": -1, "SEND_B": -1, "RECV_B": 1, "SEND_F": 1}  # the stage a transfer action waits for


@dataclasses.dataclass(slots=True)
class TimelineEvent:
    """One recorded action on this rank (wall-clock seconds since the epoch, comparable across local ranks)."""

    name: str
    kind: str
    stage: int
    start: float
    end: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "stage": self.stage, "start": self.start, "end": self.end}


def _needs_grad(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


@dataclasses.dataclass
class _Ctx:
    recv: list[Any]
    send: list[Any]
    loss: torch.Tensor | None
    weight_pass: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    """Outputs and their gradients, kept by an input-gradient pass (I) for the weight-gradient pass (W)."""


class PipelineExecutor:
    """Runs one rank's part of a pipeline schedule for one training step."""

    def __init__(self, *, stages: Mapping[int, Stage], schedule: Schedule, transport: Transport,
                 peers: Sequence[int], num_stages: int, loss_fn: LossFn | None, timeout: float = 30.0,
                 record: bool = False) -> None:
        self.stages = dict(stages)
        self.schedule = schedule
        self.transport = transport
        self.peers = list(peers)
        self.position = self.peers.index(transport.rank)
        self.num_stages = num_stages
        self.loss_fn = loss_fn
        self.timeout = timeout
        self.record = record
        self.timeline: list[TimelineEvent] = []

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _rank_of(self, stage: int) -> int:
        return self.peers[stage % self.schedule.ranks]

    def _tag(self, boundary: int, microbatch: int, backward: bool) -> int:
        return (boundary * self.schedule.microbatches + microbatch) * 2 + int(backward)

    def _recv_peer(self, action: Action) -> tuple[int, int]:
        """``(src rank, tag)`` of a RECV_F / RECV_B action: the neighbour stage's rank and the boundary's tag."""
        if action.kind == "RECV_F":
            return self._rank_of(action.stage - 1), self._tag(action.stage - 1, action.microbatch, False)
        return self._rank_of(action.stage + 1), self._tag(action.stage, action.microbatch, True)

    # -- one step ---------------------------------------------------------------------------------------------------
    def run(self, inputs: Sequence[Mapping[str, Any]], *, loss_scale: float = 1.0) -> list[float]:
        """Run every action of this rank for one step. ``inputs[m]``: the model inputs microbatch ``m`` needs here.

        Returns the unscaled loss of every microbatch whose loss this rank computed (the last stage), in order.
        """
        actions = self.schedule.actions.get(self.position, [])
        self.timeline = []
        self._recv_f: dict[tuple[int, int], list[Any]] = {}
        self._recv_b: dict[tuple[int, int], list[Any]] = {}
        self._local_f: dict[tuple[int, int], list[Any]] = {}
        self._local_b: dict[tuple[int, int], list[Any]] = {}
        self._ctx: dict[tuple[int, int], _Ctx] = {}
        self._out_f: dict[tuple[int, int], list[Any]] = {}
        self._out_b: dict[tuple[int, int], list[Any]] = {}
        self._handles: list[SendHandle] = []
        self._losses: dict[int, float] = {}
        self._inputs = inputs
        self._scale = loss_scale
        for action in actions:  # receive ahead: every transfer of the step lands while this rank computes
            if action.kind in ("RECV_F", "RECV_B"):
                src, tag = self._recv_peer(action)
                self.transport.post_recv(src=src, tag=tag)
        for step, action in enumerate(actions):
            start = time.time()
            try:
                self._dispatch(action)
            except Exception as exc:
                grid = self.schedule.grid(mark=(self.position, step), window=6)
                here = (f"rank {self.transport.rank}, stage {action.stage}, action {action} "
                        f"(microbatch {action.microbatch})")
                peer = exc.peer if isinstance(exc, CommTimeoutError) else None
                if peer is not None and action.kind in _PEER_STAGE:
                    waited = "to receive from it" if action.kind.startswith("RECV") else "for it to receive"
                    head = (f"rank {peer} (stage {action.stage + _PEER_STAGE[action.kind]}) stopped answering: {here} "
                            f"waited {exc.waited:.1f} s {waited}; is that process alive, stopped, or stuck?")
                else:
                    head = f"{here} failed"
                raise StepError(f"{head}: {type(exc).__name__}: {exc}\n{grid}", peer=peer) from exc
            if self.record:
                self.timeline.append(TimelineEvent(str(action), action.kind, action.stage, start, time.time()))
        start = time.time()
        for handle in self._handles:
            handle.wait(self.timeout)
        if self.record and self._handles:
            self.timeline.append(TimelineEvent("wait sends", "wait", -1, start, time.time()))
        return [self._losses[m] for m in sorted(self._losses)]

    def _dispatch(self, action: Action) -> None:
        s, m = action.stage, action.microbatch
        kind = action.kind
        if kind == "F":
            self._forward(s, m)
        elif kind == "B":
            self._backward(s, m, inputs=True, weights=True)
        elif kind == "I":
            self._backward(s, m, inputs=True, weights=False)
        elif kind == "W":
            self._backward(s, m, inputs=False, weights=True)
        elif kind == "SEND_F":
            values = self._out_f.pop((s, m))
            self._handles.append(self.transport.isend(values, dst=self._rank_of(s + 1), tag=self._tag(s, m, False)))
        elif kind == "RECV_F":
            # Shapes and dtypes are checked against the partition: a mismatch is a typed error, never a hang.
            src, tag = self._recv_peer(action)
            self._recv_f[(s, m)] = self.transport.recv(src=src, tag=tag, timeout=self.timeout,
                                                       expect=self.stages[s].spec.recv)
        elif kind == "SEND_B":
            grads = self._out_b.pop((s, m))
            self._handles.append(self.transport.isend(grads, dst=self._rank_of(s - 1), tag=self._tag(s - 1, m, True)))
        elif kind == "RECV_B":
            src, tag = self._recv_peer(action)
            self._recv_b[(s, m)] = self.transport.recv(src=src, tag=tag, timeout=self.timeout)
        else:  # pragma: no cover - the schedule validator rejects unknown kinds
            raise ValueError(f"unknown action kind {kind!r}")

    def _forward(self, s: int, m: int) -> None:
        stage = self.stages[s]
        if s == 0:
            recv: list[Any] = []
        elif (s, m) in self._recv_f:
            recv = self._recv_f.pop((s, m))
        else:
            recv = self._local_f.pop((s, m))
        ran = run_forward(stage, recv, self._inputs[m], grad=True)
        send, outs = ran.send, ran.outputs
        loss = None
        if s == self.num_stages - 1:
            if self.loss_fn is None:
                raise RuntimeError("the last stage needs a loss function")
            full: list[Any] = [None] * (max(stage.output_index, default=-1) + 1)
            for leaf, value in zip(stage.output_index, outs):
                full[leaf] = value
            loss = self.loss_fn(full, m)
            self._losses[m] = float(loss.detach())
        self._ctx[(s, m)] = _Ctx(recv=ran.recv, send=send, loss=loss)
        if s < self.num_stages - 1:
            if self._rank_of(s + 1) == self.transport.rank:
                self._local_f[(s + 1, m)] = send
            else:
                self._out_f[(s, m)] = send

    def _output_grads(self, s: int, m: int, ctx: _Ctx) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if ctx.loss is not None:
            return [ctx.loss * self._scale], [torch.ones_like(ctx.loss)]
        outs = [v for v in ctx.send if _needs_grad(v)]
        if (s, m) in self._recv_b:
            grads = self._recv_b.pop((s, m))
        else:
            grads = self._local_b.pop((s, m))
        if len(grads) != len(outs):
            raise RuntimeError(f"received {len(grads)} gradients for {len(outs)} sent tensors that require grad")
        return outs, list(grads)

    def _backward(self, s: int, m: int, *, inputs: bool, weights: bool) -> None:
        key = (s, m)
        ctx = self._ctx[key]
        if inputs:
            outs, grads = self._output_grads(s, m, ctx)
            leaves = [v for v in ctx.recv if _needs_grad(v)]
            if weights:
                params = [p for p in self.stages[s].parameters() if p.requires_grad]
                if outs:
                    torch.autograd.backward(outs, grads, inputs=[*leaves, *params] or None)
                in_grads = [v.grad if v.grad is not None else torch.zeros_like(v) for v in leaves]
            else:
                got = torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True) if leaves else ()
                in_grads = [g if g is not None else torch.zeros_like(v) for g, v in zip(got, leaves)]
                ctx.recv, ctx.send = [], []  # keep only what the weight pass needs
                ctx.weight_pass = (outs, grads)
            if s > 0:
                if self._rank_of(s - 1) == self.transport.rank:
                    self._local_b[(s - 1, m)] = in_grads
                else:
                    self._out_b[key] = in_grads
        else:
            assert ctx.weight_pass is not None, "W before I (the schedule validator rejects this)"
            outs, grads = ctx.weight_pass
            params = [p for p in self.stages[s].parameters() if p.requires_grad]
            if outs and params:
                torch.autograd.backward(outs, grads, inputs=params)
        if weights:
            del self._ctx[key]
