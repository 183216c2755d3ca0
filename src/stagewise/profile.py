"""Measure every unit of a captured model: forward and backward time (warm-up, then the median of repeats)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .runtime._executor import as_leaf
from .split._build import _Layout, build_stage, plan_stages
from .split._capture import Capture

__all__ = ["profile_units"]


def profile_units(cap: Capture, inputs: dict[str, torch.Tensor], *, repeats: int = 3, warmup: int = 1,
                  threads: int = 1) -> list[tuple[float, float]]:
    """(forward ms, backward ms) of every unit, each run alone on the values that reach it.

    Timed with ``threads`` compute threads (1, like each training rank by default): on a busy machine a multi-threaded
    tiny op can take 100x longer while OpenMP threads spin, which would make the costs noise.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _profile(cap, inputs, repeats=repeats, warmup=warmup)
    finally:
        torch.set_num_threads(previous)


def _profile(cap: Capture, inputs: dict[str, torch.Tensor], *, repeats: int, warmup: int) -> list[tuple[float, float]]:
    nodes: list[list[Any]] = [[] for _ in cap.units]
    for node in cap.compute_nodes():
        nodes[cap.node_unit[node]].append(node)
    layout = _Layout(nodes=nodes, parents=[i - 1 if i else None for i in range(len(nodes))],
                     units=[[u] for u in cap.units], heads=[None] * len(nodes))
    stages = [build_stage(cap, spec, n) for spec, n in zip(plan_stages(cap, layout), nodes)]
    example = inputs
    fwd_times: list[list[float]] = [[] for _ in stages]
    bwd_times: list[list[float]] = [[] for _ in stages]
    for rep in range(warmup + repeats):
        recv: list[Any] = []
        for i, stage in enumerate(stages):
            recv = [as_leaf(v) for v in recv]
            start = time.perf_counter()
            send, outs = stage(recv, example)
            fwd = time.perf_counter() - start
            grads_for = [t for t in [*send, *outs] if isinstance(t, torch.Tensor) and t.requires_grad]
            start = time.perf_counter()
            if grads_for:
                torch.autograd.backward(grads_for, [torch.ones_like(t) for t in grads_for])
            bwd = time.perf_counter() - start
            if rep >= warmup:
                fwd_times[i].append(fwd * 1e3)
                bwd_times[i].append(bwd * 1e3)
            recv = send
    for stage in stages:
        for p in stage.parameters():
            p.grad = None
    return [(statistics.median(f), statistics.median(b)) for f, b in zip(fwd_times, bwd_times)]
