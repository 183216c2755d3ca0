"""The Plan: plain data saying how to lay a model out on a cluster, with what the cost model predicts for it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from .._errors import StagewiseError
from ..schedule import SCHEDULE_NAMES, ScheduleName
from ._probe import Calibration

__all__ = ["MODES", "RANK_ORDERS", "Plan", "PlanError", "RankOrder", "Verified", "rank_of"]

MODES = ("train", "serve")
RankOrder = Literal["pipelines", "stages"]
RANK_ORDERS: tuple[RankOrder, ...] = ("pipelines", "stages")
"""How global ranks map to (replica, pipeline position): ``pipelines`` numbers a replica's pipeline consecutively
(rank = replica x P + position; torchrun puts consecutive ranks on one host, so pipeline neighbours share it),
``stages`` numbers a position's replicas consecutively (rank = position x D + replica: a stage's replicas share a
host and its all-reduce stays there)."""


def rank_of(order: str, *, replica: int, position: int, stages: int, replicas: int) -> int:
    """The global rank (device) that runs pipeline ``position`` of ``replica`` under ``order``."""
    if order == "stages":
        return position * replicas + replica
    if order != "pipelines":
        raise ValueError(f"rank order must be one of {RANK_ORDERS}, got {order!r}")
    return replica * stages + position


class PlanError(StagewiseError, ValueError):
    """No layout fits the cluster; the message names the smallest change that would make one fit."""


@dataclasses.dataclass(kw_only=True)
class Verified:
    """One candidate layout that verification (``stagewise plan --verify``) trained for a few steps."""

    layout: str
    """The candidate as :meth:`Plan.layout_text` writes it (replicas x stages, schedule, microbatches, cut)."""
    predicted_step_s: float
    """What the cost model predicted per step."""
    measured_step_s: float
    """What the training processes measured per step: the median over the steps after the warm-up."""
    predicted_memory_bytes: list[int] = dataclasses.field(default_factory=list)
    """Per pipeline rank, the predicted peak (:attr:`Plan.memory_bytes`)."""
    measured_memory_bytes: list[int] = dataclasses.field(default_factory=list)
    """Per pipeline rank, what the ranks measured on their first step (weights, gradients, optimizer state, saved
    activations; the most of any replica)."""

    @property
    def miss(self) -> float:
        """``measured / predicted - 1``: positive when the step was slower than predicted."""
        return self.measured_step_s / self.predicted_step_s - 1 if self.predicted_step_s > 0 else math.inf


@dataclasses.dataclass(kw_only=True)
class Plan:
    """One layout of a model on a cluster (stages x replicas, cut, microbatches, schedule) and its predicted cost."""

    mode: str
    """``train`` (ranked by predicted step time) or ``serve`` (ranked by throughput, then latency)."""
    devices: int
    """Devices used: ``stages * replicas``."""
    stages: int
    """Pipeline ranks P (processes per replica; TrainConfig.stages)."""
    replicas: int
    """Data-parallel replicas D of the whole pipeline."""
    stages_per_rank: int
    """Virtual stages V per rank (2 only with the interleaved schedule); the model is cut into P x V stages."""
    microbatches: int
    """Microbatches M per replica per step."""
    schedule: ScheduleName
    """Pipeline schedule: gpipe, 1f1b, interleaved or zb."""
    global_batch: int
    """Samples per step over all replicas (train) or per batch wave (serve)."""
    microbatch_rows: int
    """Rows per microbatch: ``global_batch / (replicas * microbatches)``."""
    cut: list[str]
    """Name of the first unit of every stage, in order (P x V names; the first is the chain's first unit)."""
    step_time_s: float
    """Predicted seconds per step (train: simulated pipeline + gradient all-reduce + optimizer; serve: one batch wave
    through the simulated forward pipeline)."""
    bubble_fraction: float
    """Idle share of the simulated pipeline (0 = no bubble)."""
    memory_bytes: list[int]
    """Predicted peak memory of each pipeline rank's device (the same on every replica): the sum of the four parts
    below."""
    device_memory_bytes: int
    """Memory of one device, the cap every rank fits under."""
    stage_time_s: list[float] = dataclasses.field(default_factory=list)
    """Predicted compute seconds per microbatch of every stage (forward + backward in train, forward in serve)."""
    throughput: float = 0.0
    """Samples per second over all replicas."""
    latency_s: float = 0.0
    """Seconds for one microbatch to pass forward through the pipeline, transfers included."""
    allreduce_s: float = 0.0
    """Predicted seconds the slowest rank spends after its last pipeline action (train): gradient all-reduce,
    optimizer step and the loss all-reduce."""
    model: str | None = None
    """The ``MODEL`` string planned for, when known."""
    weight_bytes: list[int] = dataclasses.field(default_factory=list)
    """Per pipeline rank: bytes of its stages' parameters and buffers (empty in a plan written before it existed)."""
    gradient_bytes: list[int] = dataclasses.field(default_factory=list)
    """Per pipeline rank: bytes of their gradients (train; 0 in serve)."""
    optimizer_bytes: list[int] = dataclasses.field(default_factory=list)
    """Per pipeline rank: bytes of the optimizer state (train: :data:`~stagewise.plan.STATE_FACTORS` x parameters)."""
    activation_bytes: list[int] = dataclasses.field(default_factory=list)
    """Per pipeline rank: activation bytes at the peak, the most microbatches alive at each stage under the schedule
    (:func:`stagewise.schedule.peak_activations`) times what a stage holds per microbatch (its input and every unit's
    output at ``microbatch_rows``)."""
    rank_order: RankOrder = "pipelines"
    """Which stage and replica each global rank runs (:data:`RANK_ORDERS`, :meth:`placement`): the cost model prices
    the links between the hosts the ranks land on (global rank ``g`` on the cluster's device ``g``)."""
    threads: int = 1
    """Compute threads per training process the units were profiled with and the plan runs with
    (TrainConfig.threads)."""
    calibration: Calibration | None = None
    """What the cost model's links, per-message and per-action overheads and compute contention were measured on
    (host, time, figures); None: a cluster file's or the built-in figures."""
    measured_step_s: float | None = None
    """Seconds per step this layout measured when verified (``stagewise plan --verify``); None: not run."""
    verified: list[Verified] = dataclasses.field(default_factory=list)
    """Every candidate verification ran, in predicted order, with predicted and measured step time (this plan is
    the fastest measured of them)."""

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):  # read from JSON
            self.calibration = Calibration.from_dict(self.calibration)
        self.verified = [Verified(**v) if isinstance(v, dict) else v for v in self.verified]
        if self.mode not in MODES:
            raise ValueError(f"Plan.mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in SCHEDULE_NAMES:
            raise ValueError(f"Plan.schedule must be one of {SCHEDULE_NAMES}, got {self.schedule!r}")
        for name in ("devices", "stages", "replicas", "stages_per_rank", "microbatches", "global_batch",
                     "microbatch_rows", "device_memory_bytes", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Plan.{name} must be an int >= 1, got {value!r}")
        if self.stages_per_rank != 1 and self.schedule != "interleaved":
            raise ValueError(f"Plan.stages_per_rank={self.stages_per_rank} needs schedule 'interleaved'")
        if self.devices != self.stages * self.replicas:
            raise ValueError(f"Plan.devices ({self.devices}) must equal stages x replicas "
                             f"({self.stages} x {self.replicas})")
        if self.global_batch != self.replicas * self.microbatches * self.microbatch_rows:
            raise ValueError(f"Plan.global_batch ({self.global_batch}) must equal replicas x microbatches x "
                             f"microbatch_rows ({self.replicas} x {self.microbatches} x {self.microbatch_rows})")
        if len(self.cut) != self.num_stages or len(set(self.cut)) != len(self.cut):
            raise ValueError(f"Plan.cut must name {self.num_stages} distinct first units (one per stage), "
                             f"got {self.cut!r}")
        if len(self.memory_bytes) != self.stages:
            raise ValueError(f"Plan.memory_bytes must have one entry per pipeline rank ({self.stages}), "
                             f"got {len(self.memory_bytes)}")
        parts = [self.weight_bytes, self.gradient_bytes, self.optimizer_bytes, self.activation_bytes]
        if any(parts):
            if any(len(part) != self.stages for part in parts):
                raise ValueError(f"Plan.weight_bytes, gradient_bytes, optimizer_bytes and activation_bytes need one "
                                 f"entry per pipeline rank ({self.stages}) each, or none")
            sums = [sum(ranks) for ranks in zip(*parts)]
            if sums != list(self.memory_bytes):
                raise ValueError(f"Plan.memory_bytes ({self.memory_bytes}) must be the sum of weights, gradients, "
                                 f"optimizer state and activations per rank ({sums})")
        if self.rank_order not in RANK_ORDERS:
            raise ValueError(f"Plan.rank_order must be one of {RANK_ORDERS}, got {self.rank_order!r}")
        for name in ("step_time_s", "bubble_fraction", "throughput", "latency_s", "allreduce_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Plan.{name} must be a finite number >= 0, got {value!r}")
        if self.measured_step_s is not None and not (math.isfinite(self.measured_step_s) and self.measured_step_s > 0):
            raise ValueError(f"Plan.measured_step_s must be a finite number > 0 or None, got {self.measured_step_s!r}")

    @property
    def num_stages(self) -> int:
        """Stages the model is cut into: ``stages * stages_per_rank``."""
        return self.stages * self.stages_per_rank

    @property
    def peak_memory_bytes(self) -> int:
        """The fullest device's predicted memory."""
        return max(self.memory_bytes)

    def to_train_kwargs(self) -> dict[str, Any]:
        """The :class:`stagewise.train.TrainConfig` fields this plan sets (pass them with ``model=``)."""
        return {"stages": self.stages, "replicas": self.replicas, "microbatches": self.microbatches,
                "schedule": self.schedule, "stages_per_rank": self.stages_per_rank,
                "global_batch": self.global_batch, "cuts": list(self.cut[1:]) or None, "rank_order": self.rank_order,
                "threads": self.threads}

    def placement(self) -> list[tuple[int, int]]:
        """Per global rank: the (pipeline position, replica) it runs."""
        where = {rank_of(self.rank_order, replica=d, position=p, stages=self.stages, replicas=self.replicas): (p, d)
                 for d in range(self.replicas) for p in range(self.stages)}
        return [where[g] for g in range(self.devices)]

    def layout_text(self) -> str:
        """The layout in a few words: ``2x1 1f1b M=4 cut 0|layers.3`` (replicas x stages, ``vN`` virtual stages per
        rank, schedule, microbatches, the first unit of every stage)."""
        virt = f" v{self.stages_per_rank}" if self.stages_per_rank > 1 else ""
        return f"{self.replicas}x{self.stages}{virt} {self.schedule} M={self.microbatches} cut {'|'.join(self.cut)}"

    def describe(self) -> str:
        """One line: layout, schedule and prediction."""
        virt = f"x{self.stages_per_rank}" if self.stages_per_rank > 1 else ""
        return (f"{self.replicas} replica(s) x {self.stages}{virt} stage(s), {self.schedule}, M={self.microbatches} "
                f"({self.microbatch_rows} rows): step {self.step_time_s * 1e3:.3f} ms, "
                f"bubble {self.bubble_fraction:.1%}"
                + (", a stage's replicas on consecutive ranks" if self.rank_order == "stages" else ""))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def same_layout(self, other: Plan) -> bool:
        """Whether ``other`` runs the same way (stages, replicas, virtual stages, microbatches, schedule, cut)."""
        fields = ("stages", "replicas", "stages_per_rank", "microbatches", "schedule", "cut", "global_batch")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text (also written to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. runs/plan.json on a fresh checkout
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown plan field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Plan:
        """Parse JSON text, or read it from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
