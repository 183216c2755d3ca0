"""One training process: build only this rank's stages, then run schedule steps, sync and update."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._progress import StepProgress
from ..comm import Transport
from ..runtime import StepError, all_reduce_grads, clip_global_norm, merge_traces, render_timeline, write_rank_trace
from ..split import SavedBytes, Stage, StagePack
from ._config import TrainConfig
from ._data import ReplicaBatches, rank_microbatches
from ._memory import MEMORY_KINDS, storage_bytes
from ._rank import RankState, setup_rank, stage_tensors

if TYPE_CHECKING:
    from ..checkpoint import CheckpointWriter
    from ._checkpointing import Snapshots
    from ._push import WeightPusher

__all__ = ["run_worker"]

log = logging.getLogger(__name__)


def run_worker(config: TrainConfig, transport: Transport, *, pack: StagePack,
               should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Train on this rank; returns a summary (losses on every rank, since the loss is all-reduced).

    ``pack``: this rank's stages, split once for every rank (by the launcher, or by rank 0 under torchrun).
    ``should_stop`` is asked once a step: when it says True on any rank, every rank ends after the same step (the
    answer rides on the step's loss all-reduce, so they agree), saving a checkpoint there when ``save_dir`` is set.

    With ``config.runtime.device`` cuda the rank's stages, their inputs and targets, the loss and the optimizer state
    live on the rank's GPU (:func:`rank_device`); the graph is still captured on the CPU and each stage moved
    afterwards. """
    rs = setup_rank(config, transport, pack)
    if config.output.resume:
        from ._checkpointing import restore_checkpoint

        rs.start_step = restore_checkpoint(rs)
    loader = _loader(rs)
    writer = _writer(rs)
    pusher = None
    if config.output.serve_url:
        from ._push import WeightPusher

        assert config.output.push_dir is not None  # the launcher picks one for the whole run
        pusher = WeightPusher(rs, folder=Path(config.output.push_dir))
    start = time.perf_counter()
    gc.freeze()  # the model, captures and torch's own objects: later collections skip them (a full one is ~0.1 s)
    memory: dict[str, int] = {}
    try:
        done = _train(rs, loader, writer, should_stop, memory, pusher)
    finally:
        if pusher is not None:
            pusher.close()
    return _finish(rs, done=done, elapsed=time.perf_counter() - start, memory=memory)


def _loader(rs: RankState) -> Iterator[Any] | None:
    """This replica's batches from ``start_step`` on, or None when this rank's stages read no data."""
    if not rs.loads_data:
        return None
    return iter(ReplicaBatches(rs.dataset, data=rs.config.data, replica=rs.replica, replicas=rs.layout.D,
                               steps=rs.config.steps, start_step=rs.start_step))


def _writer(rs: RankState) -> CheckpointWriter | None:
    """The checkpoint writer when ``save_dir`` is set (rank 0 cleans up what an earlier run left), else None."""
    if not rs.config.output.save_dir:
        return None
    from ..checkpoint import CheckpointWriter

    return CheckpointWriter(rs.config.output.save_dir, keep=rs.config.output.keep, clean=rs.rank == 0)


def _train(rs: RankState, loader: Iterator[Any] | None, writer: CheckpointWriter | None,
           should_stop: Callable[[], bool], memory: dict[str, int], pusher: WeightPusher | None = None) -> int:
    """Run the steps from ``start_step``; returns the last step done (earlier than ``steps`` when asked to stop).
    The first step fills ``memory`` with what this rank measured (:mod:`._memory`); ``pusher`` hands the weights to
    a running service when due."""
    config = rs.config
    progress = StepProgress(total=config.steps, start=rs.start_step, enabled=config.output.progress and rs.rank == 0)
    where = f"rank {rs.rank} (stage {', '.join(map(str, sorted(rs.stages)))}, replica {rs.replica})"
    done = rs.start_step
    rs.step_s.clear()
    snapshots = None
    folder = config.recovery.snapshot_dir
    if folder and config.recovery.max_restarts:
        from ..checkpoint import CheckpointWriter
        from ._checkpointing import Snapshots

        same = writer is not None and folder == config.output.save_dir
        snapshots = Snapshots(rs, writer if same else CheckpointWriter(folder, keep=2, clean=rs.rank == 0))
    try:
        for step in range(rs.start_step, config.steps):
            try:
                began = time.perf_counter()
                loss, stop = _train_step(rs, None if loader is None else next(loader), should_stop,
                                         None if memory else memory)
                rs.step_s.append(time.perf_counter() - began)  # every rank leaves a step at its loss all-reduce
                rs.losses.append(loss)
                progress.update(step + 1, loss)
                log_every = config.output.log_every
                if rs.rank == 0 and log_every and (step + 1) % log_every == 0 and not progress.enabled:
                    print(f"step {step + 1}/{config.steps} loss {loss:.6f}", flush=True)
                done = step + 1
                _maybe_save(rs, writer, snapshots, step=done, stop=stop)
                if pusher is not None and (stop or pusher.due(done)):
                    pusher.push(done)
                if stop and done < config.steps:
                    # the command line says where it stopped (and the checkpoint); the Python API reads stopped_by
                    log.info("asked to stop: ending after step %d of %d", done, config.steps)
                    break
            except StepError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{where} failed at step {step + 1}: {type(exc).__name__}: {exc}") from exc
    finally:  # also on a failure: the bar stops drawing before the error's one line is printed
        progress.close()
    if snapshots is not None:
        snapshots.close()
    return done


def _train_step(rs: RankState, batch: Any, should_stop: Callable[[], bool],
                memory: dict[str, int] | None = None) -> tuple[float, bool]:
    """One step: the pipeline schedule, gradient sync (and clipping), the update, the loss all-reduce; returns
    ``(loss, stop)``, where ``stop`` is True when any rank was asked to stop. Given ``memory``, the step fills it
    with this rank's measured bytes (:data:`MEMORY_KINDS`)."""
    config, timeout = rs.config, rs.config.runtime.timeout
    if batch is None:
        inputs: list[dict[str, Any]] = [{} for _ in range(config.layout.microbatches)]
        rs.targets.clear()
    else:
        inputs, targets = rank_microbatches(batch, needed=rs.needed, microbatches=config.layout.microbatches,
                                            device=rs.device)
        rs.targets[:] = targets
    meter = SavedBytes(rs.params) if memory is not None else None
    with meter.counting() if meter is not None else contextlib.nullcontext():
        mb_losses = rs.executor.run(inputs, loss_scale=rs.loss_scale)
    if memory is not None:
        assert meter is not None
        modules = [st.module for st in rs.stages.values()]
        memory["weights"] = storage_bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])
        memory["gradients"] = storage_bytes(p.grad for p in rs.params)
        memory["activations"] = meter.peak
    t_sync = time.time()
    all_reduce_grads(rs.params, rs.transport, rs.dp_group, average=False, timeout=timeout)
    if config.optim.clip_grad_norm is not None:
        clip_global_norm(rs.params, config.optim.clip_grad_norm, rs.transport, rs.pp_group, timeout=timeout)
    t_opt = time.time()
    rs.optimizer.step()
    if memory is not None:
        memory["optimizer"] = storage_bytes(t for state in rs.optimizer.state.values() for t in state.values())
    rs.scheduler.step()
    rs.optimizer.zero_grad(set_to_none=True)
    if config.output.trace is not None:
        events = [e.to_dict() for e in rs.executor.timeline]
        events.append({"name": "all-reduce", "kind": "allreduce", "stage": -1, "start": t_sync, "end": t_opt})
        events.append({"name": "optimizer", "kind": "optimizer", "stage": -1, "start": t_opt, "end": time.time()})
        rs.trace_steps.append(events)
    total = torch.tensor([sum(mb_losses), float(should_stop())], dtype=torch.float64)
    rs.transport.all_reduce(total, op="sum", timeout=timeout)
    if config.data.loss_reduction == "mean":
        loss = float(total[0]) * rs.loss_scale
    else:
        loss = float(total[0]) / rs.layout.D
    return loss, bool(total[1] > 0)


def _maybe_save(rs: RankState, writer: CheckpointWriter | None, snapshots: Snapshots | None, *, step: int,
                stop: bool) -> None:
    """Save after ``step`` when a writer is set and the run ends there, stops there, or ``save_every`` says so;
    else take a snapshot (written in the background) when ``snapshot_every`` says so: a restart goes on from the
    newest of either."""
    save_every = rs.config.output.save_every
    if writer is not None and (stop or step == rs.config.steps or (save_every and step % save_every == 0)):
        from ._checkpointing import save_checkpoint

        if snapshots is not None:
            snapshots.drain()  # one writer at a time when they share the folder
        save_checkpoint(rs, writer, step=step)
    elif snapshots is not None and step % rs.config.recovery.snapshot_every == 0:
        snapshots.take(step)


def _finish(rs: RankState, *, done: int, elapsed: float, memory: dict[str, int]) -> dict[str, Any]:
    """The run's summary; replica 0 writes its stages' weights (rank 0 the summary too), every rank its trace.
    ``memory``: what every rank measured on its first step, gathered so that each summary lists all ranks."""
    ran = done - rs.start_step
    transport = rs.transport
    table = torch.zeros(transport.world_size, len(MEMORY_KINDS), dtype=torch.float64)
    table[transport.rank] = torch.tensor([float(memory.get(k, 0)) for k in MEMORY_KINDS], dtype=torch.float64)
    transport.all_reduce(table, op="sum", timeout=rs.config.runtime.timeout)  # every row but one is zero: a gather
    summary = {"losses": rs.losses, "step_s": rs.step_s, "seconds": elapsed,
               "steps_per_s": ran / elapsed if elapsed else 0.0,
               "start_step": rs.start_step, "last_step": done, "device": str(rs.device),
               "backend": getattr(transport, "backend", None),
               "staged": bool(getattr(transport, "staged", False)),
               "memory": [dict(zip(MEMORY_KINDS, map(int, row.tolist()))) for row in table]}
    output = rs.config.output
    if output.out_dir and rs.replica == 0:
        _write_outputs(Path(output.out_dir), rs.stages, summary if rs.rank == 0 else None)
    if output.trace is not None:
        _write_trace(rs, Path(output.trace))
    transport.barrier(timeout=rs.config.runtime.timeout)
    return summary


def _write_trace(rs: RankState, trace_dir: Path) -> None:
    """Every rank writes its steps' events; rank 0 then merges them into one trace and renders the timeline."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    write_rank_trace(trace_dir / f"rank{rs.rank}.json", rank=rs.rank, steps=rs.trace_steps)
    rs.transport.barrier(timeout=rs.config.runtime.timeout)
    if rs.rank == 0:
        merge_traces(trace_dir, schedule=rs.schedule)
        render_timeline(trace_dir, schedule=rs.schedule)


def _write_outputs(out: Path, stages: dict[int, Stage], summary: dict[str, Any] | None) -> None:
    """Each stage's weights as ``stage{s}.safetensors`` and, from rank 0, ``summary.json``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for s, stage in stages.items():
        tensors = {k: v.cpu().contiguous() for k, v in stage_tensors({s: stage}).items()}
        save_file(tensors, str(out / f"stage{s}.safetensors"))
    if summary is not None:
        (out / "summary.json").write_text(json.dumps(summary))
