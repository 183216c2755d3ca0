"""One training process: build only this rank's stages, then run schedule steps, sync and update."""

from __future__ import annotations

import gc
import importlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._allocator import tune_allocator
from .._spec import ModelSpec, load_model_spec
from ..comm import CommGroup, Transport
from ..runtime import PipelineExecutor, StepError, all_reduce_grads, broadcast_params, clip_global_norm
from ..schedule import add_communication, build, validate
from ..split import Partition, input_leaves, split, unflatten
from ._config import OPTIMIZER_CLASSES, TrainConfig
from ._data import ReplicaBatches, sample_to_call, split_microbatches
from ._device import move_stage, resolve_device, strict_fp32, to_device
from ._progress import Progress

__all__ = ["Layout", "model_loss", "rank_device", "run_worker"]

log = logging.getLogger(__name__)


class Layout:
    """Where every rank sits: rank = replica * P + position; stage s runs at position s % P."""

    def __init__(self, config: TrainConfig) -> None:
        self.P = config.layout.stages
        self.D = config.layout.replicas
        self.V = config.layout.stages_per_rank
        self.S = self.P * self.V

    def place(self, rank: int) -> tuple[int, int]:
        replica, position = divmod(rank, self.P)
        return replica, position

    def pipeline(self, replica: int) -> list[int]:
        return [replica * self.P + p for p in range(self.P)]

    def replicas_of(self, position: int) -> list[int]:
        return [d * self.P + position for d in range(self.D)]


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


def example_batch(spec: ModelSpec, rows: int) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """The first ``rows`` samples of the data set, collated: inputs with the microbatch shape for graph capture."""
    if spec.dataset is None:
        raise ValueError(f"model {spec.name!r} has no dataset; training needs ModelSpec.dataset")
    data = spec.dataset()
    if len(data) < rows:
        raise ValueError(f"the data set has {len(data)} samples, fewer than one microbatch of {rows}")
    batch = torch.utils.data.default_collate([data[i] for i in range(rows)])
    args, kwargs = sample_to_call(batch[0])
    return args, kwargs, data


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> tuple[Any, Any]:
    if config.optim.optimizer in OPTIMIZER_CLASSES:
        cls = OPTIMIZER_CLASSES[config.optim.optimizer]
    else:
        module, _, name = config.optim.optimizer.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    opt: torch.optim.Optimizer = cls(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay,
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


def run_worker(config: TrainConfig, transport: Transport, *,
               should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Train on this rank; returns a summary (losses on every rank, since the loss is all-reduced).

    ``should_stop`` is asked once a step: when it says True on any rank, every rank ends after the same step (the
    answer rides on the step's loss all-reduce, so they agree), saving a checkpoint there when ``save_dir`` is set.

    With ``config.runtime.device`` cuda the rank's stages, their inputs and targets, the loss and the optimizer state
    live on the rank's GPU (:func:`rank_device`); the graph is still captured on the CPU and each stage moved
    afterwards. """
    tune_allocator()
    torch.set_num_threads(config.runtime.threads)
    torch.manual_seed(config.data.seed)
    layout = Layout(config)
    rank = transport.rank
    if transport.world_size != config.world_size:
        raise ValueError(f"world size is {transport.world_size} but stages x replicas = {config.world_size}; "
                         f"launch {config.world_size} processes")
    replica, position = layout.place(rank)
    spec = load_model_spec(config.model)
    spec.model.train(config.split.dropout)
    args, kwargs, dataset = example_batch(spec, config.microbatch_size)
    if config.split.partition:
        partition = Partition.from_json(config.split.partition)
        cuts = [partition.units[i].name for i in partition.starts[1:]]
        sm = split(spec.model, args, kwargs, stages=layout.S, cuts=cuts or None, model_name=config.model)
    else:
        sm = split(spec.model, args, kwargs, stages=layout.S, by=config.split.by, cuts=config.split.cuts,
                   model_name=config.model)
    cap, stages = sm.stages_for(args, kwargs)
    mine = {s: stages[s] for s in range(layout.S) if s % layout.P == position}
    device = rank_device(config, transport)
    if device.type != "cpu":
        strict_fp32(device)
        for st in mine.values():
            move_stage(st, device)
        if rank == 0:
            log.info("training on %s (backend %s%s)", device, getattr(transport, "backend", "?"),
                     ", staged through pinned host memory" if getattr(transport, "staged", False) else "")
    params = [p for st in mine.values() for p in st.parameters() if p.requires_grad]
    # Every rank creates every group in the same order (a torch.distributed requirement).
    dp_groups = [transport.new_group(layout.replicas_of(p)) for p in range(layout.P)]
    pp_groups = [transport.new_group(layout.pipeline(d)) for d in range(layout.D)]
    dp_group: CommGroup = dp_groups[position]
    pp_group: CommGroup = pp_groups[replica]
    state = [t for st in mine.values() for t in st.module.state_dict().values()]
    broadcast_params(state, transport, dp_group, src=layout.replicas_of(position)[0], timeout=config.runtime.timeout)
    optimizer, scheduler = make_optimizer(config, params)
    named = [(n, p) for st in mine.values() for n, p in st.named_parameters() if p.requires_grad]
    start_step = 0
    if config.output.resume:
        start_step = _resume(config, mine, optimizer, scheduler, named, rank, layout)
    schedule = add_communication(build(config.layout.schedule, ranks=layout.P, microbatches=config.layout.microbatches,
                                       stages_per_rank=layout.V))
    validate(schedule)
    targets_by_mb: list[Any] = []

    def loss_fn(full: list[Any], m: int) -> torch.Tensor:
        leaves = full + [None] * (len(cap.output_names) - len(full))
        return model_loss(spec, unflatten(cap.out_spec, leaves), targets_by_mb[m])

    executor = PipelineExecutor(stages=mine, schedule=schedule, transport=transport, peers=layout.pipeline(replica),
                                num_stages=layout.S, loss_fn=loss_fn, timeout=config.runtime.timeout,
                                record=config.output.trace is not None)
    trace_steps: list[list[dict[str, Any]]] = []
    needed = sorted({name for st in mine.values() for name in st.spec.inputs})
    has_loss = (layout.S - 1) in mine
    loader = None
    if needed or has_loss:
        loader = iter(ReplicaBatches(dataset, replica=replica, replicas=layout.D, global_batch=config.data.global_batch,
                                     steps=config.steps, seed=config.data.seed, shuffle=config.data.shuffle,
                                     mode=config.data.sharding, num_workers=config.data.num_workers,
                                     start_step=start_step))
    writer = None
    if config.output.save_dir:
        from ..checkpoint import CheckpointWriter

        writer = CheckpointWriter(config.output.save_dir, keep=config.output.keep, clean=rank == 0)
    scale = 1.0 / (config.layout.microbatches * layout.D) if config.data.loss_reduction == "mean" else 1.0
    losses: list[float] = []
    progress = Progress(total=config.steps, enabled=config.output.progress and rank == 0)
    start = time.perf_counter()
    where = f"rank {rank} (stage {', '.join(map(str, sorted(mine)))}, replica {replica})"
    gc.freeze()  # the model, captures and torch's own objects: later collections skip them (a full one is ~0.1 s)
    done = start_step
    for step in range(start_step, config.steps):
        try:
            inputs: list[dict[str, Any]] = [{} for _ in range(config.layout.microbatches)]
            targets_by_mb.clear()
            if loader is not None:
                microbatches = split_microbatches(next(loader), config.layout.microbatches)
                for m, (mb_inputs, mb_targets) in enumerate(microbatches):
                    a, k = sample_to_call(mb_inputs)
                    leaves, names, _ = input_leaves(a, k)
                    inputs[m] = {n: t for n, t in zip(names, leaves) if n in needed}
                    targets_by_mb.append(mb_targets)
                    if device.type != "cpu":
                        inputs[m] = to_device(inputs[m], device)
                        targets_by_mb[m] = to_device(mb_targets, device)
            mb_losses = executor.run(inputs, loss_scale=scale)
            t_sync = time.time()
            all_reduce_grads(params, transport, dp_group, average=False, timeout=config.runtime.timeout)
            if config.optim.clip_grad_norm is not None:
                clip_global_norm(params, config.optim.clip_grad_norm, transport, pp_group,
                                 timeout=config.runtime.timeout)
            t_opt = time.time()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if config.output.trace is not None:
                events = [e.to_dict() for e in executor.timeline]
                events.append({"name": "all-reduce", "kind": "allreduce", "stage": -1, "start": t_sync, "end": t_opt})
                events.append({"name": "optimizer", "kind": "optimizer", "stage": -1, "start": t_opt,
                               "end": time.time()})
                trace_steps.append(events)
            total = torch.tensor([sum(mb_losses), float(should_stop())], dtype=torch.float64)
            transport.all_reduce(total, op="sum", timeout=config.runtime.timeout)
            stop = bool(total[1] > 0)
            loss = float(total[0]) * scale if config.data.loss_reduction == "mean" else float(total[0]) / layout.D
            losses.append(loss)
            progress.update(step + 1, loss)
            log_every = config.output.log_every
            if rank == 0 and log_every and (step + 1) % log_every == 0 and not progress.enabled:
                print(f"step {step + 1}/{config.steps} loss {loss:.6f}", flush=True)
            done = step + 1
            save_every = config.output.save_every
            if writer is not None and (stop or done == config.steps or (save_every and done % save_every == 0)):
                _save(writer, done, config, sm.partition, mine, optimizer, scheduler, named, transport, layout,
                      losses=losses, start_step=start_step)
            if stop and done < config.steps:
                if rank == 0:
                    log.warning("asked to stop: ending after step %d of %d", done, config.steps)
                break
        except StepError:
            raise
        except Exception as exc:
            raise RuntimeError(f"{where} failed at step {step + 1}: {type(exc).__name__}: {exc}") from exc
    progress.close()
    elapsed = time.perf_counter() - start
    ran = done - start_step
    summary = {"losses": losses, "seconds": elapsed, "steps_per_s": ran / elapsed if elapsed else 0.0,
               "start_step": start_step, "last_step": done, "device": str(device),
               "backend": getattr(transport, "backend", None),
               "staged": bool(getattr(transport, "staged", False))}
    if config.output.out_dir and replica == 0:
        _write_outputs(Path(config.output.out_dir), mine, summary if rank == 0 else None)
    if config.output.trace is not None:
        _write_trace(Path(config.output.trace), rank, trace_steps, schedule, transport, config.runtime.timeout)
    transport.barrier(timeout=config.runtime.timeout)
    return summary


def _write_trace(trace_dir: Path, rank: int, steps: list[list[dict[str, Any]]], schedule: Any,
                 transport: Transport, timeout: float) -> None:
    from ..runtime import merge_traces, render_timeline, write_rank_trace

    trace_dir.mkdir(parents=True, exist_ok=True)
    write_rank_trace(trace_dir / f"rank{rank}.json", rank=rank, steps=steps)
    transport.barrier(timeout=timeout)
    if rank == 0:
        merge_traces(trace_dir, schedule=schedule)
        render_timeline(trace_dir, schedule=schedule)


def _write_outputs(out: Path, stages: dict[int, Any], summary: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for s, stage in stages.items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in stage.module.state_dict().items()
                   if not k.startswith("_stagewise_const")}
        save_file(tensors, str(out / f"stage{s}.safetensors"))
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary))


def _stage_tensors(stages: dict[int, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for st in stages.values() for k, v in st.module.state_dict().items()
            if not k.startswith("_stagewise_const")}


def _save(writer: Any, step: int, config: TrainConfig, partition: Partition, stages: dict[int, Any], optimizer: Any,
          scheduler: Any, named: list[tuple[str, torch.nn.Parameter]], transport: Transport, layout: Layout, *,
          losses: list[float], start_step: int) -> None:
    """Every rank saves its RNG; replica 0 also its stages' weights and optimizer state; rank 0 commits."""
    from ..checkpoint import optimizer_state_by_fqn, rng_state_json

    rank = transport.rank
    replica, _ = layout.place(rank)
    tensors: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    if replica == 0:
        tensors = _stage_tensors(stages)
        optim, meta = optimizer_state_by_fqn(optimizer, named)
    writer.save_part(step, part=f"rank{rank}", tensors=tensors, optimizer=optim, optimizer_meta=meta,
                     extra_json={"rank": rank, "rng": rng_state_json()})
    transport.barrier(timeout=config.runtime.timeout)
    if rank == 0:
        writer.commit(step, parts=[f"rank{r}" for r in range(transport.world_size)], partition=partition,
                      manifest_extra={"step": step, "layout": {"stages": layout.P, "replicas": layout.D,
                                                               "stages_per_rank": layout.V},
                                      "lr_scheduler": {"last_epoch": scheduler.last_epoch},
                                      "losses": losses, "first_step": start_step,
                                      "config": json.loads(config.to_json())})
    transport.barrier(timeout=config.runtime.timeout)


def _resume(config: TrainConfig, stages: dict[int, Any], optimizer: Any, scheduler: Any,
            named: list[tuple[str, torch.nn.Parameter]], rank: int, layout: Layout) -> int:
    """Load this rank's weights and optimizer state by FQN from any layout's checkpoint; returns the step reached."""
    from ..checkpoint import load_checkpoint, load_optimizer_state, restore_rng_state

    assert config.output.resume is not None
    ckpt = load_checkpoint(config.output.resume, verify="read")  # each rank hashes the files it reads, as it reads them
    keys = list(_stage_tensors(stages))
    saved = ckpt.tensors(keys)
    missing = [k for k in keys if k not in saved]
    if missing:
        raise ValueError(f"checkpoint {ckpt.path} has no tensors for {missing[:5]}; was it saved from this model?")
    with torch.no_grad():
        for st in stages.values():
            own = st.module.state_dict()
            for k, v in own.items():
                if k in saved:
                    v.copy_(saved[k])
    fqns = [n for n, _ in named]
    load_optimizer_state(optimizer, named, ckpt.optimizer_state(fqns), ckpt.optimizer_meta(fqns))
    extra = ckpt.extra
    scheduler.last_epoch = int(extra.get("lr_scheduler", {}).get("last_epoch", ckpt.step))
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    same_layout = extra.get("layout") == {"stages": layout.P, "replicas": layout.D, "stages_per_rank": layout.V}
    part = f"rank{rank}"
    if same_layout and part in ckpt.parts:
        restore_rng_state(ckpt.part_extra(part)["rng"])
    else:  # another layout: RNG streams cannot map rank to rank; start a fresh, deterministic one
        torch.manual_seed(config.data.seed + ckpt.step)
    return ckpt.step
