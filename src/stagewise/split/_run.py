"""Run a split model's stages one after the other in this process: the one loop that does it.

:meth:`SplitModel.run <stagewise.split.SplitModel.run>` (checking a split against the model), the serving gateway
(reading the served outputs' metadata from one run) and the unit profiler (timing each unit on what reaches it) all
go through :func:`run_stages`; processes that run one stage each use :func:`stagewise.runtime.run_forward` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._build import Stage

__all__ = ["StageCall", "as_leaf", "run_stages"]

StageCall = Callable[[Stage, list[Any]], tuple[list[Any], list[Any]]]
"""Runs one stage on what it received: ``(stage, recv) -> (send, outputs)``."""


def as_leaf(value: Any) -> Any:
    """A received value as a fresh autograd leaf (keeps requires_grad of what was sent), so a backward through the
    receiving stage stops at its inputs, as it does when the value came over the wire."""
    if isinstance(value, torch.Tensor):
        leaf = value.detach()
        if value.requires_grad:
            leaf.requires_grad_(True)
        return leaf
    return value


def run_stages(stages: Sequence[Stage], inputs: Mapping[str, Any], *, outputs: int,
               call: StageCall | None = None) -> list[Any]:
    """Run ``stages`` in order on the model ``inputs`` (leaf name -> value); each stage receives, by name, what its
    parent stage sent. Returns the ``outputs`` model output leaves (None for any no stage here produced).

    ``call(stage, recv)`` replaces ``stage(recv, inputs)``, e.g. to time it; it returns what the stage returns.
    """
    results: list[Any] = [None] * outputs
    sent: dict[int, dict[str, Any]] = {}
    for stage in stages:
        parent = stage.spec.parent
        recv = [] if parent is None else [sent[parent][v.name] for v in stage.spec.recv]
        send, outs = stage(recv, inputs) if call is None else call(stage, recv)
        sent[stage.index] = {v.name: x for v, x in zip(stage.spec.send, send)}
        for leaf, value in zip(stage.output_index, outs):
            results[leaf] = value
    return results
