"""Measure every unit of a captured model: forward and backward time (warm-up, then the median of repeats).

Each unit becomes a one-unit stage; the stages run in order (:func:`run_stages`), each timed on what reaches it,
received as fresh leaves so that its backward stops at its own inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from .._timing import median_ms
from ._build import _Layout, build_stage, plan_stages
from ._capture import Capture
from ._run import as_leaf, run_stages

__all__ = ["profile_units"]


def profile_units(cap: Capture, inputs: dict[str, torch.Tensor], *, repeats: int = 3,
                  warmup: int = 1) -> list[tuple[float, float]]:
    """(forward ms, backward ms) of every unit, each run alone on the values that reach it, with the caller's compute
    threads (:func:`stagewise._timing.num_threads`)."""
    nodes: list[list[Any]] = [[] for _ in cap.units]
    for node in cap.compute_nodes():
        nodes[cap.node_unit[node]].append(node)
    layout = _Layout(nodes=nodes, parents=[i - 1 if i else None for i in range(len(nodes))],
                     units=[[u] for u in cap.units], heads=[None] * len(nodes))
    stages = [build_stage(cap, spec, n) for spec, n in zip(plan_stages(cap, layout), nodes)]
    times: list[tuple[float, float]] = []

    def timed(stage: Any, recv: list[Any]) -> tuple[list[Any], list[Any]]:
        leaves = [as_leaf(v) for v in recv]
        last: list[tuple[list[Any], list[Any]]] = []

        def forward() -> tuple[list[Any], list[Any]]:
            last[:] = [stage(leaves, inputs)]
            return last[0]

        times.append(median_ms(forward, _backward, repeats=repeats, warmup=warmup))
        return last[0]  # the values the next unit is timed on (run_stages hands them on; as_leaf detaches them)

    run_stages(stages, inputs, outputs=len(cap.output_names), call=timed)
    for stage in stages:
        for p in stage.parameters():
            p.grad = None
    return times


def _backward(result: tuple[list[Any], list[Any]]) -> None:
    send, outs = result
    grads_for = [t for t in [*send, *outs] if isinstance(t, torch.Tensor) and t.requires_grad]
    if grads_for:
        torch.autograd.backward(grads_for, [torch.ones_like(t) for t in grads_for])
