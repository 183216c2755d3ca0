"""Training configuration: one typed tree that the CLI maps onto 1:1 and that travels to workers as JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from ..schedule import SCHEDULE_NAMES, ScheduleName

__all__ = ["TrainConfig", "SCHEDULES", "OPTIMIZERS", "OPTIMIZER_CLASSES"]

SCHEDULES = SCHEDULE_NAMES
"""The schedule names (:data:`stagewise.schedule.ScheduleName`), re-exported for the CLI's choices."""
DEVICES = ("cpu", "cuda", "auto")
OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
"""The optimizers known by name (any other is a dotted path)."""
OPTIMIZERS = tuple(OPTIMIZER_CLASSES)


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """How to train a split model across processes."""

    model: str
    """Model factory, ``file.py:factory`` or ``package.module:factory`` (see :class:`stagewise.ModelSpec`)."""
    stages: int = 2
    """Pipeline stages P (one process each)."""
    replicas: int = 1
    """Data-parallel replicas D of the whole pipeline; P x D processes in all."""
    microbatches: int = 4
    """Microbatches M per replica per step."""
    schedule: ScheduleName = "1f1b"
    """Pipeline schedule: gpipe, 1f1b, interleaved or zb."""
    stages_per_rank: int = 1
    """Virtual stages per process (interleaved schedule only)."""
    steps: int = 10
    """Optimizer steps to run."""
    global_batch: int = 32
    """Samples per optimizer step over all replicas and microbatches (must divide by replicas x microbatches)."""
    by: str = "params"
    """Cost used to balance the cut: uniform, params or time."""
    cuts: list[str] | None = None
    """Cut before these units instead of balancing."""
    partition: str | None = None
    """A partition JSON file (from ``stagewise split --json``) to use instead of cutting again."""
    optimizer: str = "adam"
    """Optimizer for every stage: adam, adamw, sgd, or any optimizer class by dotted path (torch.optim.RMSprop)."""
    optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keyword arguments for the optimizer (betas, momentum, eps...)."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Weight decay."""
    lr_schedule: str = "constant"
    """constant, or cosine (to 0 over ``steps``) with ``warmup_steps`` of linear warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps for the cosine schedule."""
    clip_grad_norm: float | None = None
    """Clip gradients to this global norm (computed over all stages)."""
    loss_reduction: str = "mean"
    """How the model's loss reduces over samples: mean (microbatch losses are averaged) or sum (added)."""
    data: str = "shard"
    """shard: each replica holds only its part of the data set; replicate: each holds a full copy."""
    shuffle: bool = True
    """Seeded shuffle of the data set every epoch."""
    seed: int = 0
    """Seed of the shuffle and of torch's RNG on every rank."""
    num_workers: int = 0
    """DataLoader worker processes per rank that loads data."""
    dropout: bool = True
    """Capture the model in training mode (dropout active); False captures eval mode for deterministic runs."""
    timeout: float = 30.0
    """Seconds any wait (receive, collective) may take before the run fails with an error naming it."""
    threads: int = 1
    """Compute threads per process (torch.set_num_threads)."""
    device: str = "cpu"
    """Where stages compute: cpu, cuda (rank r on GPU local_rank % GPUs; NCCL when every rank has its own GPU, else
    gloo staged through pinned host memory), or auto (cuda when CUDA is available)."""
    out_dir: str | None = None
    """Where workers write the final weights (safetensors by FQN) and the loss history."""
    save_dir: str | None = None
    """Checkpoint root: each stage saves its part (safetensors by FQN + manifest), committed atomically."""
    save_every: int = 0
    """Save every N steps (0: only at the end, when save_dir is set)."""
    keep: int = 3
    """Checkpoints kept; older ones are pruned after a commit."""
    resume: str | None = None
    """Continue from this checkpoint (a root: its latest; or a step directory), in this run's layout."""
    trace: str | None = None
    """Directory for a timeline of every action on every rank: Chrome trace (trace.json) and timeline.png."""
    log_every: int = 10
    """Print the loss every N steps."""
    progress: bool = True
    """Show a live progress bar on rank 0."""

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {self.microbatches}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.schedule != "interleaved" and self.stages_per_rank != 1:
            raise ValueError("stages_per_rank > 1 needs schedule='interleaved'")
        if self.optimizer not in OPTIMIZERS and "." not in self.optimizer:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)} or a dotted "
                             "class path such as torch.optim.RMSprop")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if self.data not in ("shard", "replicate"):
            raise ValueError(f"data must be 'shard' or 'replicate', got {self.data!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        per = self.replicas * self.microbatches
        if self.global_batch % per:
            raise ValueError(f"global_batch {self.global_batch} must divide by replicas x microbatches = {per}; "
                             f"use --global-batch {max(per, self.global_batch // per * per)}")
        if self.save_every < 0 or self.keep < 1:
            raise ValueError("save_every must be >= 0 and keep >= 1")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}; set device (--device)")

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    @property
    def microbatch_size(self) -> int:
        return self.global_batch // (self.replicas * self.microbatches)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)
