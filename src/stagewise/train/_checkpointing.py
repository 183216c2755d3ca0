"""A training run's checkpoints: every rank saves its part at a step and rank 0 commits; a resume loads each rank's
weights and optimizer state by FQN, whatever layout saved them.

Imported only by runs that save or resume: a run that does neither never loads the checkpoint package."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
from typing import Any

import torch

from .._spec import portable_model
from ..checkpoint import (
    CheckpointWriter,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state_by_fqn,
    restore_rng_state,
    rng_state_json,
    tied_groups,
)
from ._rank import RankState, stage_tensors

__all__ = ["Snapshots", "restore_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Part:
    """What one rank saves at ``step``: its part's tensors and JSON, and (rank 0) the manifest's run-wide JSON."""

    step: int
    tensors: dict[str, torch.Tensor]
    optim: dict[str, Any] | None
    meta: dict[str, Any] | None
    extra: dict[str, Any]
    manifest: dict[str, Any] | None


def _capture(rs: RankState, step: int, *, copy: bool) -> _Part:
    """This rank's state after ``step``: every rank its RNG; replica 0 also its stages' weights and optimizer state
    (copies when ``copy``: the step loop goes on while they are written); rank 0 the manifest's JSON."""
    tensors: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    if rs.replica == 0:
        tensors = stage_tensors(rs.stages)
        optim, meta = optimizer_state_by_fqn(rs.optimizer, rs.named)
        if copy:
            tensors = {k: v.detach().clone() for k, v in tensors.items()}
            optim = {fqn: {k: v.clone() for k, v in entries.items()} for fqn, entries in optim.items()}
    manifest = None
    if rs.rank == 0:
        manifest = {"step": step, "layout": rs.layout.to_json(),
                    "lr_scheduler": {"last_epoch": rs.scheduler.last_epoch},
                    "losses": list(rs.losses), "first_step": rs.start_step,
                    "config": {**json.loads(rs.config.to_json()), "model": portable_model(rs.config.model)}}
    return _Part(step=step, tensors=tensors, optim=optim, meta=meta,
                 extra={"rank": rs.rank, "rng": rng_state_json()}, manifest=manifest)


def _save_part(rs: RankState, writer: CheckpointWriter, part: _Part) -> None:
    writer.save_part(part.step, part=f"rank{rs.rank}", tensors=part.tensors, optimizer=part.optim,
                     optimizer_meta=part.meta, extra_json=part.extra)


def _commit(rs: RankState, writer: CheckpointWriter, part: _Part) -> None:
    writer.commit(part.step, parts=_parts(rs), partition=rs.partition, manifest_extra=part.manifest,
                  tied=tied_groups(rs.spec.model))


def _parts(rs: RankState) -> list[str]:
    return [f"rank{r}" for r in range(rs.transport.world_size)]


def save_checkpoint(rs: RankState, writer: CheckpointWriter, *, step: int) -> None:
    """Every rank saves its RNG; replica 0 also its stages' weights and optimizer state; rank 0 commits."""
    timeout = rs.config.runtime.timeout
    part = _capture(rs, step, copy=False)
    _save_part(rs, writer, part)
    rs.transport.barrier(timeout=timeout)
    if rs.rank == 0:
        _commit(rs, writer, part)
    rs.transport.barrier(timeout=timeout)


class Snapshots:
    """Snapshots that do not stop the step loop: :meth:`take` copies this rank's state in memory (a clone of its
    weights and optimizer state) and a thread writes it to disk; rank 0's thread commits once every rank's part is
    there (no barrier: the ranks never wait for each other's disks). The next :meth:`take` first waits for the
    previous write, so at most one snapshot is in flight. A snapshot that fails to save is logged and skipped: a
    restart then takes an older one."""

    def __init__(self, rs: RankState, writer: CheckpointWriter) -> None:
        self.rs, self.writer = rs, writer
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self._pending: concurrent.futures.Future[None] | None = None

    def take(self, step: int) -> None:
        self.drain()
        self._pending = self._pool.submit(self._save, _capture(self.rs, step, copy=True))

    def _save(self, part: _Part) -> None:
        rs = self.rs
        try:
            _save_part(rs, self.writer, part)
            if rs.rank != 0:
                return
            if self.writer.wait_for_parts(part.step, _parts(rs), timeout=rs.config.runtime.timeout):
                _commit(rs, self.writer, part)
            else:
                log.warning("snapshot of step %d not committed: not every rank saved its part within %.1f s",
                            part.step, rs.config.runtime.timeout)
        except Exception as exc:  # noqa: BLE001 - a snapshot is a safety net; the run goes on without this one
            log.warning("snapshot of step %d failed on rank %d: %s: %s", part.step, rs.rank, type(exc).__name__, exc)

    def drain(self) -> None:
        """Wait for the snapshot being written, if any."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.drain()
        self._pool.shutdown()


def restore_checkpoint(rs: RankState) -> int:
    """Load this rank's weights and optimizer state by FQN from any layout's checkpoint; returns the step reached."""
    config = rs.config
    assert config.output.resume is not None
    ckpt = load_checkpoint(config.output.resume, verify="read")  # each rank hashes the files it reads, as it reads them
    keys = list(stage_tensors(rs.stages))
    saved = ckpt.tensors(keys)
    missing = [k for k in keys if k not in saved]
    if missing:
        raise ValueError(f"checkpoint {ckpt.path} has no tensors for {missing[:5]}; was it saved from this model?")
    with torch.no_grad():
        for st in rs.stages.values():
            own = st.module.state_dict()
            for k, v in own.items():
                if k in saved:
                    v.copy_(saved[k])
    fqns = [n for n, _ in rs.named]
    load_optimizer_state(rs.optimizer, rs.named, ckpt.optimizer_state(fqns), ckpt.optimizer_meta(fqns))
    extra = ckpt.extra
    rs.scheduler.last_epoch = int(extra.get("lr_scheduler", {}).get("last_epoch", ckpt.step))
    rs.scheduler._last_lr = [group["lr"] for group in rs.optimizer.param_groups]
    part = f"rank{rs.rank}"
    if extra.get("layout") == rs.layout.to_json() and part in ckpt.parts:
        restore_rng_state(ckpt.part_extra(part)["rng"])
    else:  # another layout: RNG streams cannot map rank to rank; start a fresh, deterministic one
        torch.manual_seed(config.data.seed + ckpt.step)
    return ckpt.step
