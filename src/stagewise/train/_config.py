"""Training configuration: one typed tree that the CLI maps onto 1:1 and that travels to workers as JSON.

``TrainConfig`` holds the model and the step count, and one group per concern: ``split`` (how the model is cut),
``layout`` (stages x replicas x microbatches and the schedule), ``optim``, ``data``, ``runtime``, ``output`` and
``recovery``. Every leaf setting has one name in the whole tree, which is also its flag (``stages`` -> ``--stages``),
so a config is written flat, ``TrainConfig(model=m, stages=4, lr=1e-3)``, or by group, ``TrainConfig(model=m,
layout=LayoutConfig(stages=4))``; it is read by group, ``config.layout.stages``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, get_args

from .._errors import ConfigError
from .._optimizers import OPTIMIZERS
from .._settings import build_tree, check_choices, flag_of
from ..plan import RankOrder
from ..schedule import ScheduleName

__all__ = [
    "OPTIMIZERS",
    "DataConfig",
    "LayoutConfig",
    "OptimConfig",
    "OutputConfig",
    "RecoveryConfig",
    "RuntimeConfig",
    "SplitConfig",
    "StartConfig",
    "TrainConfig",
]

Device = Literal["cpu", "cuda", "auto"]
DEVICES: tuple[str, ...] = get_args(Device)
TransportName = Literal["auto", "shm", "gloo"]
TRANSPORTS: tuple[str, ...] = get_args(TransportName)


def _at_least(config: Any, minimum: int, *names: str) -> None:
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {getattr(config, name)}; "
                              f"set {flag_of(type(config), name)}")


@dataclasses.dataclass(kw_only=True, slots=True)
class SplitConfig:
    """How the model is cut into stages."""

    by: Literal["params", "time", "uniform"] = "params"
    """Cost that the exact min-max cut balances: params, measured time, or uniform (unit count). params is the default
    everywhere (split, train): it needs no timing and is the same on every rank and every run."""
    cuts: list[str] | None = dataclasses.field(default=None, metadata={"metavar": "FQN,..."})
    """Cut before these units instead of balancing (each names the first unit of a stage)."""
    partition: str | None = dataclasses.field(default=None, metadata={"flag": "--plan", "metavar": "FILE"})
    """A plan from 'stagewise plan --json' (sets layout, cut, microbatches, schedule) or a partition from
    'stagewise split --json' (sets the cut)."""
    dropout: bool = True
    """Capture the model in training mode (dropout active); --no-dropout captures eval mode for deterministic runs."""

    def __post_init__(self) -> None:
        check_choices(self)


DType = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(kw_only=True, slots=True)
class StartConfig:
    """Where the weights start from (each process allocates only its own stages' weights)."""

    weights: str | None = dataclasses.field(default=None, metadata={"metavar": "PATH"})
    """Load the starting weights from PATH: a Stagewise checkpoint, a Hugging Face model folder, a .safetensors file
    or a state_dict file (each process reads only its stages' tensors)."""
    init: Literal["factory", "seeded"] = "factory"
    """Weights without --weights: factory (as the factory made them; every process builds the whole model once) or
    seeded (each module initialised from (seed, its name): the same weights in every layout, no full copy anywhere;
    for models too big for one process)."""
    dtype: DType = "float32"
    """Weight dtype: float32, bfloat16 or float16 (files are read straight into it)."""

    def __post_init__(self) -> None:
        check_choices(self)


@dataclasses.dataclass(kw_only=True, slots=True)
class LayoutConfig:
    """How many processes run the pipeline, and in which order they run their microbatches."""

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
    rank_order: RankOrder = "pipelines"
    """Which stage and replica each global rank runs: pipelines (rank = replica x P + stage: a replica's pipeline on
    consecutive ranks, so on one host under torchrun) or stages (rank = stage x D + replica: a stage's replicas on one
    host, the gradient all-reduce on the fast links). `stagewise plan --cluster` picks the cheaper one."""

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self, 1, "stages", "replicas", "microbatches", "stages_per_rank")
        if self.schedule != "interleaved" and self.stages_per_rank != 1:
            raise ConfigError(f"stages_per_rank {self.stages_per_rank} needs the interleaved schedule; set "
                              "--schedule interleaved or --stages-per-rank 1")


@dataclasses.dataclass(kw_only=True, slots=True)
class OptimConfig:
    """The optimizer of every stage and its learning-rate schedule."""

    optimizer: str = "adam"
    """Optimizer of every stage: adam, adamw, sgd, or any optimizer class by dotted path (torch.optim.RMSprop)."""
    optimizer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"metavar": "JSON"})
    """Extra keyword arguments of the optimizer, as a JSON object ('{"betas": [0.9, 0.95]}')."""
    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Weight decay."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """LR schedule: constant, or cosine (to 0 over the steps) after warmup_steps of linear warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps of the cosine schedule."""
    clip_grad_norm: float | None = None
    """Clip gradients to this global norm (computed over all stages)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.optimizer not in OPTIMIZERS and "." not in self.optimizer:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; set --optimizer to one of "
                              f"{', '.join(OPTIMIZERS)} or a dotted class path such as torch.optim.RMSprop")
        _at_least(self, 0, "warmup_steps")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}; set --lr (e.g. --lr 1e-3)")


@dataclasses.dataclass(kw_only=True, slots=True)
class DataConfig:
    """How each step's samples are drawn and shared out."""

    global_batch: int = 32
    """Samples per optimizer step over all replicas and microbatches (must divide by replicas x microbatches)."""
    sharding: Literal["shard", "replicate"] = dataclasses.field(default="shard", metadata={"flag": "--data"})
    """shard: each replica holds only its part of the data set; replicate: each holds a full copy."""
    shuffle: bool = True
    """Seeded shuffle of the data set every epoch (--no-shuffle reads it in order)."""
    seed: int = 0
    """Seed of the shuffle and of torch's RNG on every rank."""
    num_workers: int = 0
    """DataLoader worker processes per rank that loads data."""
    loss_reduction: Literal["mean", "sum"] = "mean"
    """How the model's loss reduces over samples: mean (microbatch losses are averaged) or sum (added)."""

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self, 1, "global_batch")
        _at_least(self, 0, "num_workers")


@dataclasses.dataclass(kw_only=True, slots=True)
class RuntimeConfig:
    """Where and how each process computes."""

    timeout: float = 30.0
    """Seconds any wait (receive, collective) may take before the run fails with an error naming it."""
    threads: int = 1
    """Compute threads per process (torch.set_num_threads); with --plan and no --threads, the plan's (stagewise plan
    --threads auto: the host's cores divided by its ranks)."""
    device: Device = "cpu"
    """Where stages compute: cpu, cuda (rank r on GPU local_rank % GPUs; NCCL when every rank has its own GPU, else
    gloo staged through pinned host memory), or auto (cuda when CUDA is available)."""
    transport: TransportName = "auto"
    """How ranks exchange activations and gradients: shm (shared-memory rings between the processes of this machine,
    CPU only; collectives on gloo), gloo, or auto (gloo on the CPU, NCCL or staged gloo on GPUs, as --device says)."""
    launcher: Literal["local", "ray"] = "local"
    """What starts the ranks: local (processes on this machine) or ray (one actor per rank in a placement group on
    the Ray cluster RAY_ADDRESS names, else on a local Ray started for the run; needs stagewise[ray])."""
    iface: str | None = dataclasses.field(default=None, metadata={"metavar": "NAME"})
    """Network interface the ranks talk through across hosts (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME); by
    default gloo picks the interface of the host name."""

    def __post_init__(self) -> None:
        check_choices(self)
        _at_least(self, 1, "threads")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {self.timeout}; set --timeout")
        if self.transport == "shm" and self.device == "cuda":
            raise ConfigError("transport 'shm' moves CPU tensors and device is cuda; use --transport auto (NCCL or "
                              "staged gloo) or --device cpu")


@dataclasses.dataclass(kw_only=True, slots=True)
class OutputConfig:
    """What the run writes: weights, checkpoints, trace and progress."""

    out_dir: str | None = dataclasses.field(default=None, metadata={"flag": "--out", "metavar": "DIR"})
    """Where workers write the final weights (safetensors by FQN) and the loss history."""
    save_dir: str | None = dataclasses.field(default=None, metadata={"flag": "--save", "metavar": "DIR"})
    """Checkpoint root: weights, optimizer, RNG and data position by FQN (safetensors + manifest), committed
    atomically."""
    save_every: int = 0
    """Save every N steps (0: only at the end, when --save is set)."""
    keep: int = 3
    """Checkpoints kept; older ones are pruned after a commit."""
    resume: str | None = dataclasses.field(default=None, metadata={"metavar": "DIR"})
    """Continue from this checkpoint (a root: its latest; or a step directory), in any stages x replicas layout."""
    trace: str | None = dataclasses.field(default=None, metadata={"metavar": "DIR"})
    """Record every action of every rank: DIR/trace.json (Chrome/Perfetto) and DIR/timeline.png."""
    log_every: int = 10
    """Print the loss every N steps (when no progress bar shows; 0: never)."""
    progress: bool = True
    """Show a live progress bar (step, loss, steps/s, time left) on stderr when it is a terminal."""
    serve_url: str | None = dataclasses.field(default=None, metadata={"metavar": "URL"})
    """A running 'stagewise serve' (http://HOST:PORT, or http://HOST:PORT/v2/models/NAME; default NAME: the model's)
    that loads the weights every --push-every steps and after the last one, without stopping (model_version = step)."""
    push_every: int = 0
    """With --serve-url: push every N steps (0: only after the last step)."""
    push_dir: str | None = dataclasses.field(default=None, metadata={"metavar": "DIR"})
    """With --serve-url: where pushed weights go (the last 3 pushes kept, left in place at the end: a restarting
    serving replica reads its version there); default a folder in /dev/shm (shared memory: no disk on the way)."""

    def __post_init__(self) -> None:
        _at_least(self, 0, "save_every", "log_every", "push_every")
        _at_least(self, 1, "keep")
        if self.push_every and not self.serve_url:
            raise ConfigError("--push-every pushes weights to a running service: give it with --serve-url URL")


@dataclasses.dataclass(kw_only=True, slots=True)
class RecoveryConfig:
    """How a local run survives a rank that dies or hangs: every rank stops and the run restarts from its newest
    snapshot (a checkpoint every --snapshot-every steps), with the same result as a run without the failure."""

    max_restarts: int = 0
    """Restarts after a rank dies (a crash, SIGKILL) or hangs (no heartbeat): every rank is stopped and the run goes
    on from the newest complete snapshot. 0: the first failure ends the run."""
    snapshot_every: int = 10
    """With --max-restarts: take a snapshot every K steps (copied in memory, written to disk by a thread); a failure
    recomputes at most K steps."""
    snapshot_dir: str | None = dataclasses.field(default=None, metadata={"metavar": "DIR"})
    """Where snapshots go: the --save folder when given, else a private temporary folder removed at the end."""
    heartbeat_timeout: float = 10.0
    """With --max-restarts: seconds a rank's process may go without a heartbeat (it is stopped: SIGSTOP, a debugger, a
    deadlock) before it counts as hung. A rank stuck in a wait fails by --timeout instead."""

    def __post_init__(self) -> None:
        _at_least(self, 0, "max_restarts")
        _at_least(self, 1, "snapshot_every")
        if not self.heartbeat_timeout > 0:
            raise ConfigError(f"heartbeat_timeout must be > 0, got {self.heartbeat_timeout}; set --heartbeat-timeout")


@dataclasses.dataclass(kw_only=True, slots=True, init=False)
class TrainConfig:
    """How to train a split model across processes.

    Built from any mix of groups and leaf settings: ``TrainConfig(model=m, stages=4, lr=1e-3)`` sets two leaves on
    the default groups; a leaf given next to its group (``layout=..., stages=4``) is applied on top of that group
    (so :func:`dataclasses.replace` takes leaf names too). Groups may also be given as dicts (the JSON form).
    """

    model: str = dataclasses.field(metadata={"metavar": "MODEL"})
    """Model factory, 'path/to/file.py:factory' or 'package.module:factory'; its ModelSpec must have a dataset."""
    steps: int = 10
    """Optimizer steps to run."""
    start: StartConfig = dataclasses.field(default_factory=StartConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    layout: LayoutConfig = dataclasses.field(default_factory=LayoutConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    recovery: RecoveryConfig = dataclasses.field(default_factory=RecoveryConfig)

    def __init__(self, **settings: Any) -> None:
        for name, value in build_tree(TrainConfig, settings).items():
            setattr(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        _at_least(self, 1, "steps")
        per = self.layout.replicas * self.layout.microbatches
        if self.data.global_batch % per:
            raise ConfigError(f"global_batch {self.data.global_batch} must divide by replicas x microbatches = {per}; "
                              f"use --global-batch {max(per, self.data.global_batch // per * per)}")

    @property
    def world_size(self) -> int:
        return self.layout.stages * self.layout.replicas

    @property
    def microbatch_size(self) -> int:
        return self.data.global_batch // (self.layout.replicas * self.layout.microbatches)

    @property
    def samples_read(self) -> int:
        """Samples the run reads at most: what an iterable data set (no indexing) is read into memory up to."""
        return self.steps * self.data.global_batch

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)
