"""Close the planner's loop: what a run measured next to what its plan predicted (step time and memory per rank).

A run trained from a plan (``stagewise train --plan plan.json``, :class:`Trainer` with ``plan=``) gets a
:class:`PlanCheck` in :attr:`TrainResult.plan_check`: the predicted step time and the median measured one after the
warm-up steps, the predicted and measured peak bytes of every pipeline rank, and warnings for misses larger than
:data:`MISS` that say what to re-run.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..plan import Plan

__all__ = ["MISS", "WARMUP_STEPS", "PlanCheck", "measured_step_s", "pipeline_memory"]

MISS = 0.20
"""A measured step time or memory this far (relative) from the plan's prediction is a warning."""

WARMUP_STEPS = 2
"""Steps not counted in the measured step time: the first ones fault memory in and warm the allocator up."""


def measured_step_s(step_s: Sequence[float], warmup: int = WARMUP_STEPS) -> float | None:
    """The median of the step times after ``warmup`` steps (fewer skipped when the run was shorter; None: no step)."""
    if not step_s:
        return None
    return statistics.median(step_s[min(warmup, len(step_s) - 1):])


def pipeline_memory(memory: Sequence[dict[str, int]], stages: int) -> list[int]:
    """Per pipeline rank, the most bytes any replica's rank measured (``memory[rank]``: weights, gradients, optimizer
    state, activations; rank = replica x stages + position)."""
    out = [0] * stages
    for rank, parts in enumerate(memory):
        position = rank % stages
        out[position] = max(out[position], sum(parts.values()))
    return out


@dataclasses.dataclass(kw_only=True)
class PlanCheck:
    """What a run measured next to what its plan predicted."""

    predicted_step_s: float
    """The plan's predicted seconds per step."""
    measured_step_s: float
    """The median measured seconds per step after the warm-up steps."""
    warmup: int
    """Steps left out of the measurement."""
    predicted_memory_bytes: list[int]
    """Per pipeline rank, the plan's predicted peak bytes."""
    measured_memory_bytes: list[int]
    """Per pipeline rank, what the ranks measured on their first step (the most of any replica); empty: not known."""
    verified_step_s: float | None = None
    """What verification measured for this layout when the plan was made (None: not verified)."""
    model: str | None = None
    """The plan's model, for the command the warnings suggest."""
    calibrated: str | None = None
    """Where and when the plan's cost model was calibrated (:meth:`stagewise.plan.Calibration.describe`)."""

    @classmethod
    def of(cls, plan: Plan, *, step_s: Sequence[float], memory: Sequence[dict[str, int]],
           warmup: int = WARMUP_STEPS) -> PlanCheck | None:
        """The check of a run of ``plan`` that measured ``step_s`` (seconds of each step) and ``memory`` (per rank);
        None when it made no step."""
        measured = measured_step_s(step_s, warmup)
        if measured is None:
            return None
        return cls(predicted_step_s=plan.step_time_s, measured_step_s=measured,
                   warmup=min(warmup, len(step_s) - 1), predicted_memory_bytes=list(plan.memory_bytes),
                   measured_memory_bytes=pipeline_memory(memory, plan.stages) if memory else [],
                   verified_step_s=plan.measured_step_s, model=plan.model,
                   calibrated=plan.calibration.describe() if plan.calibration is not None else None)

    @property
    def step_miss(self) -> float:
        """``measured / predicted - 1``: positive when the run was slower than predicted."""
        return self.measured_step_s / self.predicted_step_s - 1 if self.predicted_step_s > 0 else float("inf")

    @property
    def memory_miss(self) -> list[float]:
        """Per pipeline rank, ``measured / predicted - 1`` of the peak bytes (empty when not measured)."""
        return [m / p - 1 if p > 0 else float("inf")
                for m, p in zip(self.measured_memory_bytes, self.predicted_memory_bytes)]

    def lines(self) -> list[str]:
        """What ``stagewise train`` prints: predicted vs measured step time, and peak memory per rank."""
        out = [f"step time: predicted {self.predicted_step_s * 1e3:.2f} ms, measured {self.measured_step_s * 1e3:.2f}"
               f" ms (median after {self.warmup} warm-up step(s)), {self.step_miss:+.0%}"
               + (f"; verification measured {self.verified_step_s * 1e3:.2f} ms" if self.verified_step_s else "")]
        if self.measured_memory_bytes:
            mib = 2**20
            out.append("memory per rank: " + ", ".join(
                f"rank {r} predicted {p / mib:.1f} MiB measured {m / mib:.1f} MiB"
                for r, (p, m) in enumerate(zip(self.predicted_memory_bytes, self.measured_memory_bytes))))
        return out

    def warnings(self, *, threshold: float = MISS) -> list[str]:
        """One line per miss larger than ``threshold``, each saying what to re-run."""
        model = self.model or "MODEL"
        again = (f"re-run 'stagewise plan {model} --verify 3' on this machine (it calibrates here and now, then "
                 "trains the best candidates for a few steps each)")
        where = f"; the plan was calibrated on {self.calibrated}" if self.calibrated else ""
        out = []
        if abs(self.step_miss) > threshold:
            slower = "slower" if self.step_miss > 0 else "faster"
            out.append(f"warning: steps took {self.measured_step_s * 1e3:.2f} ms, {abs(self.step_miss):.0%} {slower} "
                       f"than the plan predicted ({self.predicted_step_s * 1e3:.2f} ms){where}; {again}")
        bad = [(r, miss) for r, miss in enumerate(self.memory_miss) if abs(miss) > threshold]
        if bad:
            ranks = ", ".join(f"rank {r} {miss:+.0%}" for r, miss in bad)
            out.append(f"warning: measured peak memory differs from the plan's prediction by more than "
                       f"{threshold:.0%} ({ranks}); re-run 'stagewise plan {model}' with this run's settings "
                       "(--global-batch, --optimizer)")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, path: str | Path) -> None:
        """Write as JSON (``plan_check.json`` next to a run's weights)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
