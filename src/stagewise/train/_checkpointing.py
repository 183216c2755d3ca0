"""A training run's checkpoints: every rank saves its part at a step and rank 0 commits; a resume loads each rank's
weights and optimizer state by FQN, whatever layout saved them.

Imported only by runs that save or resume: a run that does neither never loads the checkpoint package."""

from __future__ import annotations

import json
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

__all__ = ["restore_checkpoint", "save_checkpoint"]


def save_checkpoint(rs: RankState, writer: CheckpointWriter, *, step: int) -> None:
    """Every rank saves its RNG; replica 0 also its stages' weights and optimizer state; rank 0 commits."""
    rank, layout, timeout = rs.rank, rs.layout, rs.config.runtime.timeout
    tensors: dict[str, torch.Tensor] = {}
    optim: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    if rs.replica == 0:
        tensors = stage_tensors(rs.stages)
        optim, meta = optimizer_state_by_fqn(rs.optimizer, rs.named)
    writer.save_part(step, part=f"rank{rank}", tensors=tensors, optimizer=optim, optimizer_meta=meta,
                     extra_json={"rank": rank, "rng": rng_state_json()})
    rs.transport.barrier(timeout=timeout)
    if rank == 0:
        writer.commit(step, parts=[f"rank{r}" for r in range(rs.transport.world_size)], partition=rs.partition,
                      manifest_extra={"step": step, "layout": layout.to_json(),
                                      "lr_scheduler": {"last_epoch": rs.scheduler.last_epoch},
                                      "losses": rs.losses, "first_step": rs.start_step,
                                      "config": {**json.loads(rs.config.to_json()),
                                                 "model": portable_model(rs.config.model)}},
                      tied=tied_groups(rs.spec.model))
    rs.transport.barrier(timeout=timeout)


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
