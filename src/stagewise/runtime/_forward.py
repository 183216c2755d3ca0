"""Run one stage forward in a pipeline process: the one piece of code that turns what a stage received and the model
inputs it reads into what it hands on and the model outputs it returns.

Both places that run a stage in its own process call :func:`run_forward`: the executor's ``F`` action (training:
received values become autograd leaves, so a backward stops at this stage's inputs as it does at a process boundary)
and a serving worker, batch after batch (inference: ``torch.inference_mode``, no graph). Transfers stay with each
caller, on the same :class:`~stagewise.comm.Transport` seam.

Why serving does not run a one-microbatch forward schedule through :class:`~stagewise.runtime.PipelineExecutor`: a
serving batch's framing is decided by what arrives (its row count picks which captured stage runs, so the stage and
the receive's shape check are known only after the receive), a failed batch must still travel on as "failed" so later
stages stay in sequence, a batch's sends outlive it (two stay in flight while the next batch runs, where a step waits
for its sends) and a later stage waits as long as the service idles. Each would be a serving rule inside the training
step's interpreter; and a step per batch would wait for its sends before the stage could take its next batch. What
the two really share is this: running a stage on what reached it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..split import Stage, as_leaf

__all__ = ["Forward", "run_forward"]


@dataclasses.dataclass(slots=True)
class Forward:
    """What one stage forward produced."""

    recv: list[Any]
    """The values the stage ran on: autograd leaves of what it received when ``grad`` (a backward needs them)."""
    send: list[Any]
    """What the next stage receives: ``spec.send`` order, or the ``next_recv`` names' order when given."""
    outputs: list[Any]
    """Model outputs returned by the stage, in ``spec.outputs`` order (leaf indices: ``stage.output_index``)."""
    seconds: float
    """Wall time of the stage call alone."""


def run_forward(stage: Stage, recv: Sequence[Any], inputs: Mapping[str, Any], *, grad: bool,
                next_recv: Sequence[str] | None = None) -> Forward:
    """Run ``stage`` on the values it received (``spec.recv`` order) and the model ``inputs`` it reads.

    ``grad``: record the autograd graph, on fresh leaves of ``recv`` (training); otherwise run under
    ``torch.inference_mode`` (serving: no graph, no version counters). ``next_recv``: the names the next stage
    receives, in its order (a stage of a task split sends each child its subset); None keeps ``spec.send`` order.
    """
    if grad:
        ran = [as_leaf(v) for v in recv]
        mode: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    else:
        ran = list(recv)
        mode = torch.inference_mode()
    start = time.perf_counter()
    with mode:
        send, outputs = stage(ran, inputs)
    seconds = time.perf_counter() - start
    if next_recv is not None:
        by_name = {v.name: x for v, x in zip(stage.spec.send, send)}
        send = [by_name[n] for n in next_recv]
    return Forward(recv=ran, send=send, outputs=outputs, seconds=seconds)
