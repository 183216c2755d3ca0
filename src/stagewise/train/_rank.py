"""One rank's state: where it sits (:class:`Layout`), and everything it builds before the first step
(:func:`setup_rank`: its stages on its device, its groups, its optimizer and its pipeline executor)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from .._allocator import tune_allocator
from .._errors import ConfigError
from .._optimizers import OPTIMIZERS, optimizer_class
from .._spec import ModelSpec, load_model_spec, training_data
from ..comm import CommGroup, Transport
from ..plan import rank_of
from ..runtime import PipelineExecutor, broadcast_params
from ..schedule import add_communication, build, validate
from ..split import (
    Partition,
    ReadWeights,
    SplitModel,
    Stage,
    StagePack,
    cast_meta_params,
    held_param_bytes,
    materialise,
    params_on_meta,
    release,
    split,
    tensor_aliases,
    unflatten,
)
from ._config import TrainConfig
from ._data import sample_to_call
from ._device import move_stage, resolve_device, strict_fp32

__all__ = ["Layout", "RankState", "builds_on_meta", "example_batch", "load_train_spec", "make_optimizer", "model_loss",
           "rank_device", "rank_packs", "setup_rank", "split_as_configured", "stage_tensors", "train_dtype",
           "weights_path", "weights_reader"]

log = logging.getLogger(__name__)


class Layout:
    """Where every rank sits: ``layout.rank_order`` maps rank <-> (replica, position) (:func:`stagewise.plan.rank_of`:
    by default rank = replica * P + position); stage s runs at position s % P."""

    def __init__(self, config: TrainConfig) -> None:
        self.P = config.layout.stages
        self.D = config.layout.replicas
        self.V = config.layout.stages_per_rank
        self.S = self.P * self.V
        self.order = config.layout.rank_order
        self._where = {self.rank(d, p): (d, p) for d in range(self.D) for p in range(self.P)}

    def rank(self, replica: int, position: int) -> int:
        return rank_of(self.order, replica=replica, position=position, stages=self.P, replicas=self.D)

    def place(self, rank: int) -> tuple[int, int]:
        """(replica, position) of global ``rank``."""
        return self._where[rank]

    def pipeline(self, replica: int) -> list[int]:
        return [self.rank(replica, p) for p in range(self.P)]

    def owned(self, position: int) -> list[int]:
        """The stages a rank at ``position`` runs (``stages_per_rank`` of them, interleaved)."""
        return [s for s in range(self.S) if s % self.P == position]

    def replicas_of(self, position: int) -> list[int]:
        return [self.rank(d, position) for d in range(self.D)]

    def to_json(self) -> dict[str, int | str]:
        """What a checkpoint's manifest records: a resume under the same layout restores every rank's RNG."""
        out: dict[str, int | str] = {"stages": self.P, "replicas": self.D, "stages_per_rank": self.V}
        if self.order != "pipelines":  # manifests written before rank orders existed stay equal
            out["rank_order"] = self.order
        return out


def model_loss(spec: ModelSpec, output: Any, targets: Any) -> torch.Tensor:
    """The spec's loss on ``output``, or the loss the model computed itself (Hugging Face ``labels``)."""
    if spec.loss is not None:
        return spec.loss(output, *targets)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None:
        raise ValueError(f"model {spec.name!r} has no loss: give ModelSpec.loss, or make the model return one "
                         "(e.g. pass labels to a Hugging Face model)")
    return loss


def example_batch(spec: ModelSpec, rows: int, *,
                  limit: int | None = None) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """The first ``rows`` samples of the data set (an iterable read up to ``limit`` samples), collated: inputs with
    the microbatch shape for graph capture."""
    data = training_data(spec, limit=limit)
    if len(data) < rows:
        raise ValueError(f"the data set has {len(data)} samples, fewer than one microbatch of {rows}")
    batch = torch.utils.data.default_collate([data[i] for i in range(rows)])
    args, kwargs = sample_to_call(batch[0])
    return args, kwargs, data


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> tuple[Any, Any]:
    if config.optim.optimizer in OPTIMIZERS:
        cls = optimizer_class(config.optim.optimizer)
    else:
        module, _, name = config.optim.optimizer.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    # One explicit group: torch refuses a bare empty list, and a stage without parameters (a lone ReLU) has none.
    opt: torch.optim.Optimizer = cls([{"params": params}], lr=config.optim.lr, weight_decay=config.optim.weight_decay,
                                     **config.optim.optimizer_kwargs)

    def factor(step: int) -> float:
        if config.optim.lr_schedule == "constant":
            return 1.0
        if step < config.optim.warmup_steps:
            return (step + 1) / max(1, config.optim.warmup_steps)
        span = max(1, config.steps - config.optim.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.optim.warmup_steps) / span)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def rank_device(config: TrainConfig, transport: Transport) -> torch.device:
    """Where this rank computes: the CPU, or with ``device`` cuda the transport's GPU (else the current one)."""
    if resolve_device(config.runtime.device) == "cpu":
        return torch.device("cpu")
    device = getattr(transport, "device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        return device
    return torch.device("cuda", torch.cuda.current_device())


@dataclasses.dataclass(kw_only=True, eq=False)
class RankState:
    """What one rank holds for a run: built once by :func:`_setup`, then read by every step and every save, so the
    helpers of :func:`run_worker` take this instead of ten arguments each."""

    config: TrainConfig
    transport: Transport
    layout: Layout
    replica: int
    position: int
    spec: ModelSpec
    partition: Partition
    """The split's partition: checkpoints record it, so a resume under another layout can map weights by FQN."""
    stages: dict[int, Stage]
    """This rank's stages by index (stage s sits at position s % P)."""
    device: torch.device
    dataset: Any
    params: list[torch.nn.Parameter]
    named: list[tuple[str, torch.nn.Parameter]]
    dp_group: CommGroup
    """The ranks holding the same stages in every replica: gradients are summed over it."""
    pp_group: CommGroup
    """This replica's pipeline: the global gradient norm is reduced over it."""
    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: Any
    executor: PipelineExecutor
    targets: list[Any]
    """Each microbatch's targets for the current step, read by the executor's loss function."""
    needed: frozenset[str]
    """Input leaves this rank's stages read (the first stage's model inputs)."""
    start_step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    step_s: list[float] = dataclasses.field(default_factory=list)
    """Wall seconds of each step this run made, from its start to its loss all-reduce (where every rank leaves it)."""
    trace_steps: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def loads_data(self) -> bool:
        """True when this rank reads batches: its stages take model inputs, or it holds the last stage (the loss)."""
        return bool(self.needed) or (self.layout.S - 1) in self.stages

    @property
    def loss_scale(self) -> float:
        """What each microbatch's loss is multiplied by: the mean over every microbatch of every replica, or 1."""
        if self.config.data.loss_reduction == "mean":
            return 1.0 / (self.config.layout.microbatches * self.layout.D)
        return 1.0


def setup_rank(config: TrainConfig, transport: Transport, pack: StagePack) -> RankState:
    """Seed, take this rank's stages (``pack``: split once, by the launcher or by torchrun's rank 0), give them their
    weights and place them, make the groups, agree on the weights, and build the optimizer and the pipeline
    executor."""
    tune_allocator()
    torch.set_num_threads(config.runtime.threads)
    torch.manual_seed(config.data.seed)
    layout = Layout(config)
    if transport.world_size != config.world_size:
        raise ValueError(f"world size is {transport.world_size} but stages x replicas = {config.world_size}; "
                         f"launch {config.world_size} processes")
    replica, position = layout.place(transport.rank)
    spec = load_train_spec(config)
    spec.model.train(config.split.dropout)
    _, _, dataset = example_batch(spec, config.microbatch_size, limit=config.samples_read)
    _fill_weights(config, spec.model, pack)
    mine = pack.stages
    device = _place(mine, config, transport)
    params = [p for st in mine.values() for p in st.parameters() if p.requires_grad]
    # Every rank creates every group in the same order (a torch.distributed requirement).
    dp_groups = [transport.new_group(layout.replicas_of(p)) for p in range(layout.P)]
    pp_groups = [transport.new_group(layout.pipeline(d)) for d in range(layout.D)]
    state = [t for st in mine.values() for t in st.module.state_dict().values()]
    broadcast_params(state, transport, dp_groups[position], src=layout.replicas_of(position)[0],
                     timeout=config.runtime.timeout)
    optimizer, scheduler = make_optimizer(config, params)
    schedule = add_communication(build(config.layout.schedule, ranks=layout.P, microbatches=config.layout.microbatches,
                                       stages_per_rank=layout.V))
    validate(schedule)
    targets: list[Any] = []

    def loss_fn(full: list[Any], m: int) -> torch.Tensor:
        leaves = full + [None] * (len(pack.output_names) - len(full))
        return model_loss(spec, unflatten(pack.out_spec, leaves), targets[m])

    executor = PipelineExecutor(stages=mine, schedule=schedule, transport=transport, peers=layout.pipeline(replica),
                                num_stages=layout.S, loss_fn=loss_fn, timeout=config.runtime.timeout,
                                record=config.output.trace is not None)
    return RankState(config=config, transport=transport, layout=layout, replica=replica, position=position, spec=spec,
                     partition=pack.partition, stages=mine, device=device, dataset=dataset, params=params,
                     named=[(n, p) for st in mine.values() for n, p in st.named_parameters() if p.requires_grad],
                     dp_group=dp_groups[position], pp_group=pp_groups[replica], optimizer=optimizer,
                     scheduler=scheduler, schedule=schedule, executor=executor, targets=targets,
                     needed=frozenset(name for st in mine.values() for name in st.spec.inputs))


def _fill_weights(config: TrainConfig, model: torch.nn.Module, pack: StagePack) -> None:
    """Give ``pack``'s stages their weights: made here for them alone (seeded, or read from a file) on a model built
    on the meta device; or the factory's own, after which the model drops every other stage's. Then check the
    memory promise: this rank holds exactly its own stages' parameters."""
    names = pack.param_names()
    if builds_on_meta(config):
        read = weights_reader(config)
        values = None
        if read is not None:
            params, aliases = dict(model.named_parameters()), tensor_aliases(model)
            values = read({f: params[f] for f in names}, {f: aliases.get(f, []) for f in names})
        own = materialise(model, names, values=values, seed=config.data.seed, dtype=train_dtype(config))
    else:
        params = dict(model.named_parameters())
        own = {f: params[f] for f in names}
        release(model, set(names))
    pack.fill(own)
    held, expected = held_param_bytes(model), pack.held_param_bytes()
    if held != expected or any(p.is_meta for st in pack.stages.values() for p in st.module.parameters()):
        raise RuntimeError(f"this rank holds {held} bytes of parameters but its stages {sorted(pack.stages)} own "
                           f"{expected}: a weight of another stage was allocated here (please report this as a bug)")


def rank_packs(config: TrainConfig, spec: ModelSpec | None = None) -> dict[int, StagePack]:
    """The model split once, as configured, into each pipeline position's stages without weights: what the
    launcher hands its ranks so that none of them captures the model again."""
    layout = Layout(config)
    if spec is None:
        spec = load_train_spec(config)
    spec.model.train(config.split.dropout)
    args, kwargs, _ = example_batch(spec, config.microbatch_size, limit=config.samples_read)
    sm = split_as_configured(config, spec, args, kwargs, stages=layout.S)
    return {position: sm.pack(layout.owned(position)) for position in range(layout.P)}


def builds_on_meta(config: TrainConfig) -> bool:
    """Whether every process builds the model on the meta device and allocates only its own stages' weights."""
    return weights_path(config) is not None or config.start.init == "seeded"


def train_dtype(config: TrainConfig) -> torch.dtype:
    return getattr(torch, config.start.dtype)


def load_train_spec(config: TrainConfig) -> ModelSpec:
    """The model's spec as configured: on the meta device (see :func:`builds_on_meta`) or built by the factory, with
    its weights (and floating example inputs) in the configured dtype."""
    dtype = train_dtype(config)
    if not builds_on_meta(config):
        spec = load_model_spec(config.model)
        if dtype != torch.float32:
            spec.model.to(dtype)
        return spec
    with params_on_meta():
        spec = load_model_spec(config.model)
    if dtype != torch.float32:
        cast_meta_params(spec.model, dtype)
    return spec


def weights_path(config: TrainConfig) -> str | None:
    """Where the starting weights are read from: --weights, or the Hugging Face folder MODEL; None: not from a file."""
    from ..weights import is_hf_folder

    return config.start.weights or (config.model if is_hf_folder(config.model) else None)


def weights_reader(config: TrainConfig) -> ReadWeights | None:
    """Reads a stage's starting weights from :func:`weights_path`; None: seeded init."""
    from ..weights import open_weights

    path = weights_path(config)
    if path is None:
        return None
    source = open_weights(path)
    dtype = train_dtype(config)

    def read(wanted: Mapping[str, torch.Tensor], aliases: Mapping[str, list[str]]) -> dict[str, torch.Tensor]:
        values = source.read(wanted, aliases=aliases, dtype=dtype)
        source.check_opened_only(wanted, aliases=aliases, who="this training rank")
        return values

    return read


def split_as_configured(config: TrainConfig, spec: ModelSpec, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                        stages: int) -> SplitModel:
    """The model cut into ``stages`` as configured: as a saved partition (its mode and cuts), or by
    ``split.by``/``split.cuts``."""
    if config.split.partition:
        partition = Partition.from_json(config.split.partition)
        if partition.mode == "tasks":
            raise ConfigError(f"{config.split.partition} is a task split (heads {partition.heads}); training runs a "
                              "chain of stages: split it by layers or sub-models to train, serve the heads with "
                              "'stagewise serve --tasks'")
        if partition.mode == "submodels":
            return split(spec.model, args, kwargs, submodels=partition.submodels, model_name=config.model)
        cuts = [partition.units[i].name for i in partition.starts[1:]]
        return split(spec.model, args, kwargs, stages=stages, cuts=cuts or None, model_name=config.model)
    return split(spec.model, args, kwargs, stages=stages, by=config.split.by, cuts=config.split.cuts,
                 model_name=config.model)


def _place(stages: dict[int, Stage], config: TrainConfig, transport: Transport) -> torch.device:
    """Move ``stages`` to this rank's device (:func:`rank_device`) and return it."""
    device = rank_device(config, transport)
    if device.type != "cpu":
        strict_fp32(device)
        for st in stages.values():
            move_stage(st, device)
        if transport.rank == 0:
            log.info("training on %s (backend %s%s)", device, getattr(transport, "backend", "?"),
                     ", staged through pinned host memory" if getattr(transport, "staged", False) else "")
    return device


def stage_tensors(stages: dict[int, Stage]) -> dict[str, torch.Tensor]:
    """The stages' weights and buffers by FQN (without the constants the capture lifted: they are not state)."""
    return {k: v.detach() for st in stages.values() for k, v in st.module.state_dict().items()
            if not k.startswith("_stagewise_const")}
