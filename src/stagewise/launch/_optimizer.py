"""Timing the optimizer step as a training process pays it.

What one step costs depends less on arithmetic than on memory: the optimizer state is touched once a step, so it is
cold; and every step gradients are made afresh (``zero_grad(set_to_none=True)``, then backward), and the optimizer makes
temporaries as large as the parameters. Training workers keep freed blocks mapped (:func:`~stagewise._allocator.
tune_allocator`), so those do not fault in again each step; the timing process does the same. So
:func:`time_optimizer` times, in a fresh process with caches evicted, what a step spends on memory of parameter size:
allocating fresh gradients (in training, backward does, on a step's first microbatch; the unit profile accumulates into
existing ones and misses it), then one optimizer's ``step`` and ``zero_grad`` over every unit's parameters; each unit
gets its share by parameter bytes (one optimizer streams every tensor the same way, so a rank's step is about its
bytes' share; timing each unit alone instead would count the per-step churn once per unit).
"""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._allocator import tune_allocator
from .._optimizers import OPTIMIZERS, optimizer_class
from .._spec import ModelSpec
from ..plan import ChainProfile, profile_chain
from ._spawn import spawn

__all__ = ["cache_bytes", "profile_model", "time_optimizer"]


def cache_bytes() -> int:
    """Twice the last-level cache of this machine (64 MiB when it cannot be read): enough to evict it."""
    size = 32 << 20
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    try:
        text = path.read_text().strip().upper()
        size = int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text)
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return 2 * size


def _time_in_child(rank: int, world_size: int, port: int, *, out: str, shapes_json: str, optimizer: str, repeats: int,
                   threads: int) -> None:
    """The fresh process (module level so that spawn can start it; the keywords come bound by a partial): writes each
    unit's share of the step to ``out``."""
    tune_allocator()  # as training workers do: freed blocks stay mapped between steps
    torch.set_num_threads(threads)
    units = [[torch.nn.Parameter(torch.randn(shape)) for shape in shapes] for shapes in json.loads(shapes_json)]
    params = [p for unit in units for p in unit]
    nbytes = [sum(p.numel() * p.element_size() for p in unit) for unit in units]
    total = 0.0
    if params:
        evict = torch.empty(cache_bytes(), dtype=torch.uint8)
        grads = [torch.randn_like(p) for p in params]
        opt = optimizer_class(optimizer)(params, lr=1e-3)
        times = []
        for i in range(repeats + 1):
            evict.fill_(i & 0xFF)
            start = time.perf_counter()
            for p, g in zip(params, grads):
                p.grad = g.clone()  # the fresh gradients backward makes
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:  # the first step creates the optimizer state
                times.append((time.perf_counter() - start) * 1e3)
        total = statistics.median(times)
    Path(out).write_text(json.dumps([total * b / max(1, sum(nbytes)) for b in nbytes]))


def time_optimizer(shapes: Sequence[Sequence[Sequence[int]]], *, optimizer: str = "adam", repeats: int = 5,
                   threads: int = 1, processes: int = 2, timeout: float = 120.0) -> list[float]:
    """Milliseconds a training process spends per step on making fresh gradients, then the ``optimizer`` step and
    ``zero_grad``, for each unit's parameters (``shapes[u]``: the shapes of unit ``u``'s trainable parameters,
    float32): the median of ``repeats`` steps over all of them in a fresh process with ``threads`` threads, shared out
    by parameter bytes, averaged over ``processes`` processes one after the other (processes differ by their
    allocator's history as training ranks do)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    payload = json.dumps([[list(map(int, s)) for s in unit] for unit in shapes])
    runs = []
    with tempfile.TemporaryDirectory(prefix="stagewise-optimizer-") as tmp:
        for i in range(processes):
            out = str(Path(tmp) / f"optimizer{i}.json")
            child = functools.partial(_time_in_child, out=out, shapes_json=payload, optimizer=optimizer,
                                      repeats=int(repeats), threads=int(threads))
            spawn(child, 1, timeout=timeout, stoppable=False)  # Ctrl-C: killed at once, KeyboardInterrupt here
            runs.append([float(x) for x in json.loads(Path(out).read_text())])
    return [statistics.mean(unit) for unit in zip(*runs)] if shapes else []


def profile_model(spec: ModelSpec, *, rows: Sequence[int], repeats: int = 5, rounds: int = 1, threads: int = 1,
                  optimizer: str | None = "adam", model_name: str | None = None,
                  phase: Callable[[str], object] | None = None) -> ChainProfile:
    """:func:`stagewise.plan.profile_chain` (in this process), plus one ``optimizer`` step over each unit's
    parameters timed in fresh processes (:func:`time_optimizer`; None: not timed): the planner's whole profile.
    ``phase`` is told each step as it starts (a progress display: :class:`stagewise._progress.Phases`)."""
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or None, got {optimizer!r}")
    say = phase or (lambda text: None)
    say(f"profiling every unit at {', '.join(map(str, rows))} rows")
    profile = profile_chain(spec, rows=rows, repeats=repeats, rounds=rounds, threads=threads, model_name=model_name)
    if optimizer is None or profile.param_shapes is None:
        return profile
    say(f"timing the {optimizer} step of {len(profile.units)} units in fresh processes")
    ms = time_optimizer(profile.param_shapes, optimizer=optimizer, repeats=repeats, threads=threads)
    return profile.with_optimizer(optimizer, ms)
