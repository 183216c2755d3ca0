"""Verify plans by measuring: train each candidate layout for a few steps in the processes training uses, and keep
the fastest measured.

The cost model ranks layouts well when they differ a lot and can be wrong about the order of close ones (its error
on a shared machine is 10-30%). A few real steps of each close candidate settle it: the candidates run one after
the other through :class:`Trainer` (the same local launcher, ranks and step loop as ``stagewise train``), each the
median step time after :data:`~._plan_check.WARMUP_STEPS` warm-up steps, round-robin :data:`VERIFY_ROUNDS` times.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

from ..plan import Plan, Verified
from ._config import TrainConfig
from ._plan_check import WARMUP_STEPS, pipeline_memory
from ._trainer import Trainer

__all__ = ["PREDICTION_ERROR", "VERIFY_STEPS", "to_verify", "verify_plans"]

log = logging.getLogger(__name__)

PREDICTION_ERROR = 0.20
"""The cost model's own error, relative: what ``bench/plan_accuracy.py`` measures as its worst error on a busy
shared machine. Candidates predicted closer than this to the best are worth measuring."""

AUTO_VERIFY = 3
"""At most this many candidates are verified when nobody said how many (``--verify auto``)."""

VERIFY_STEPS = WARMUP_STEPS + 8
"""Steps each candidate trains for in each round of verification: the warm-up, then the measured ones."""

VERIFY_ROUNDS = 2
"""Runs of every candidate, round-robin; each counts with its fastest run (a burst of load from other processes
rarely hits every round)."""


def to_verify(plans: Sequence[Plan], count: int | None, *, error: float = PREDICTION_ERROR) -> list[Plan]:
    """The candidates to measure, best predicted first: the first ``count`` of ``plans`` (0: none), or with
    ``count`` None (auto) the plans predicted within ``error`` of the best, at most :data:`AUTO_VERIFY`; none when
    that leaves one (the prediction already separates it from the rest)."""
    if count is not None:
        if count < 0:
            raise ValueError(f"--verify must be a count >= 0 or 'auto', got {count}")
        return list(plans[:count])
    if not plans:
        return []
    best = plans[0].step_time_s
    close = [p for p in plans[:AUTO_VERIFY] if p.step_time_s <= best * (1 + error)]
    return close if len(close) > 1 else []


def verify_plans(plans: Sequence[Plan], *, model: str, count: int | None = None, steps: int = VERIFY_STEPS,
                 rounds: int = VERIFY_ROUNDS, timeout: float = 30.0,
                 phase: Callable[[str], object] | None = None) -> list[Plan]:
    """Verify the candidates :func:`to_verify` picks from ``plans`` (``count``: the first that many; None: auto):
    train each (a layout of ``model``, train mode) for ``steps`` steps, ``rounds`` times round-robin, measuring its
    step time (its fastest round's median step after the warm-up) and per-rank memory.

    Returns ``plans`` with the verified ones first, fastest measured first, each with :attr:`Plan.measured_step_s`;
    the first (the choice) also lists every verified candidate's predicted and measured figures in
    :attr:`Plan.verified`, in predicted order. The plans not verified follow as given; with none to verify,
    ``plans`` is returned as it is. ``phase`` is told which candidate runs (a progress display). ``timeout``:
    seconds any wait of a rank may take."""
    if steps < 1 or rounds < 1:
        raise ValueError(f"steps and rounds must be >= 1, got {steps} and {rounds}")
    candidates = to_verify(plans, count)
    if not candidates:
        return list(plans)
    if any(p.mode != "train" for p in candidates):
        raise ValueError("only train plans can be verified by training them; serve plans are ranked by the model")
    say = phase or (lambda text: None)
    best: list[float] = [math.inf] * len(candidates)
    memory: list[list[int]] = [[] for _ in candidates]
    for r in range(rounds):
        for i, plan in enumerate(candidates):
            say(f"verifying {i + 1}/{len(candidates)}, round {r + 1}/{rounds}: {plan.layout_text()} ({steps} steps)")
            config = TrainConfig(model=model, steps=steps, progress=False, log_every=0, timeout=timeout,
                                 **plan.to_train_kwargs())
            result = Trainer(config).fit()
            step = result.step_time_s
            assert step is not None  # steps >= 1
            log.info("verified %s: predicted %.2f ms, measured %.2f ms", plan.layout_text(), plan.step_time_s * 1e3,
                     step * 1e3)
            best[i] = min(best[i], step)
            if result.memory:
                memory[i] = pipeline_memory(result.memory, plan.stages)
    records = [Verified(layout=p.layout_text(), predicted_step_s=p.step_time_s, measured_step_s=t,
                        predicted_memory_bytes=list(p.memory_bytes), measured_memory_bytes=m)
               for p, t, m in zip(candidates, best, memory)]
    measured = [dataclasses.replace(p, measured_step_s=t, verified=[]) for p, t in zip(candidates, best)]
    order = sorted(range(len(measured)), key=lambda i: (measured[i].measured_step_s, i))
    ranked = [measured[i] for i in order]
    ranked[0] = dataclasses.replace(ranked[0], verified=records)
    return ranked + list(plans[len(candidates):])
