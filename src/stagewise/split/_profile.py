"""Measure every unit of a captured model: forward and backward time (warm-up, then the median of repeats).

Each unit becomes a one-unit stage; the stages run in order (:func:`run_stages`), each timed on what reaches it,
received as fresh leaves so that its backward stops at its own inputs.

A model built on the meta device (:func:`~stagewise.split.params_on_meta`) is profiled without ever holding it
whole: just before a unit is timed its own parameters are materialised (the seeded initialisation), and just after,
they go back to the meta device with their gradients. What crosses to the next unit is detached, so nothing keeps a
timed unit's weights alive through the autograd graph; at any moment the process holds one unit's parameters and
gradients (plus a tied weight travelling down the chain, as it would between stages).
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import torch

from .._timing import median_ms
from ._build import Stage, _Layout, build_stage, plan_stages
from ._capture import Capture
from ._meta import materialise, release, tensor_aliases
from ._run import as_leaf, run_stages
from ._saved import SavedBytes

__all__ = ["UnitTimes", "profile_units", "time_units"]


@dataclasses.dataclass
class UnitTimes:
    """What timing the chain unit by unit found."""

    times: list[tuple[float, float]]
    """(forward ms, backward ms) of every unit."""
    outputs: list[Any]
    """The model's output leaves (detached), as :meth:`SplitModel.run` would return them flattened: what a loss is
    timed on without running the whole model again."""
    held_bytes: list[int]
    """Bytes of parameters with storage in the model while each unit was timed (the profiler's memory promise)."""
    saved_bytes: list[int]
    """Bytes every unit's forward leaves saved for its backward (:class:`SavedBytes`): its activations per
    microbatch, the input it received included when its backward needs it."""


def profile_units(cap: Capture, inputs: dict[str, torch.Tensor], *, repeats: int = 3,
                  warmup: int = 1) -> list[tuple[float, float]]:
    """(forward ms, backward ms) of every unit, each run alone on the values that reach it, with the caller's compute
    threads (:func:`stagewise._timing.num_threads`)."""
    return time_units(cap, inputs, repeats=repeats, warmup=warmup).times


def time_units(cap: Capture, inputs: dict[str, torch.Tensor], *, repeats: int = 3, warmup: int = 1,
               seed: int = 0) -> UnitTimes:
    """Time every unit as :func:`profile_units` does, materialising a meta model's parameters one unit at a time
    (seeded with ``seed``; see the module doc); keep the model's outputs and count what each unit saves for
    backward (one more forward, untimed)."""
    nodes: list[list[Any]] = [[] for _ in cap.units]
    for node in cap.compute_nodes():
        nodes[cap.node_unit[node]].append(node)
    layout = _Layout(nodes=nodes, parents=[i - 1 if i else None for i in range(len(nodes))],
                     units=[[u] for u in cap.units], heads=[None] * len(nodes))
    stages = [build_stage(cap, spec, n) for spec, n in zip(plan_stages(cap, layout), nodes)]
    times: list[tuple[float, float]] = []
    held: list[int] = []
    saved: list[int] = []
    names = list(tensor_aliases(cap.model))

    def timed(stage: Stage, recv: list[Any]) -> tuple[list[Any], list[Any]]:
        made = materialise(cap.model, stage.spec.params, seed=seed)
        if made:  # the stage was built on meta parameters: build it again on the real ones
            stage = build_stage(cap, stage.spec, nodes[stage.index])
        held.append(sum(p.nbytes for p in cap.model.parameters() if not p.is_meta))
        leaves = [as_leaf(v) for v in recv]
        last: list[tuple[list[Any], list[Any]]] = []

        def forward() -> tuple[list[Any], list[Any]]:
            last[:] = [stage(leaves, inputs)]
            return last[0]

        times.append(median_ms(forward, _backward, repeats=repeats, warmup=warmup))
        meter = SavedBytes(stage.parameters())
        with meter.counting():
            kept = stage(leaves, inputs)
        saved.append(meter.live)
        del kept
        for p in stage.parameters():
            p.grad = None
        send, outs = last[0]
        if made:
            release(cap.model, keep=set(names) - set(made))
            del stage, made, last, forward
            gc.collect()  # a graph module sits in reference cycles: free this unit's weights now, not at some later gc
        # Detached, so that no graph node downstream keeps this unit's weights (or their gradients) alive.
        return [as_leaf(v) for v in send], [as_leaf(v) for v in outs]

    outputs = run_stages(stages, inputs, outputs=len(cap.output_names), call=timed)
    return UnitTimes(times=times, outputs=[o.detach() if isinstance(o, torch.Tensor) else o for o in outputs],
                     held_bytes=held, saved_bytes=saved)


def _backward(result: tuple[list[Any], list[Any]]) -> None:
    send, outs = result
    grads_for = [t for t in [*send, *outs] if isinstance(t, torch.Tensor) and t.requires_grad]
    if grads_for:
        torch.autograd.backward(grads_for, [torch.ones_like(t) for t in grads_for])
