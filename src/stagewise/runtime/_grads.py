"""Gradient synchronisation across stage replicas and clipping by the global norm across all stages."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..comm import CommGroup, Transport

__all__ = ["all_reduce_grads", "broadcast_params", "clip_global_norm"]


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _unflat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in like:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_reduce_grads(params: Sequence[torch.nn.Parameter], transport: Transport, group: CommGroup | None, *,
                     average: bool, timeout: float, bucket_bytes: int = 32 << 20) -> None:
    """Sum (or average) the gradients of ``params`` over ``group``, in flat buckets (one collective per bucket)."""
    if group is None or group.size <= 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in [*grads, None]:
        if g is not None and (not bucket or (size + g.numel() * g.element_size() <= bucket_bytes
                                             and g.dtype == bucket[0].dtype)):
            bucket.append(g)
            size += g.numel() * g.element_size()
            continue
        if bucket:
            flat = _flat(bucket)
            transport.all_reduce(flat, group=group, op="mean" if average else "sum", timeout=timeout)
            _unflat(flat, bucket)
        bucket, size = ([g], g.numel() * g.element_size()) if g is not None else ([], 0)


def clip_global_norm(params: Sequence[torch.nn.Parameter], max_norm: float, transport: Transport,
                     group: CommGroup | None, *, timeout: float) -> float:
    """Scale gradients so that the norm over every stage's gradients is at most ``max_norm``; returns the norm.

    ``group`` holds one rank per stage (one pipeline replica): replicas hold equal gradients after synchronisation.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else None)  # beside the gradients
    for g in grads:
        local += g.detach().double().pow(2).sum()
    if group is not None and group.size > 1:
        transport.all_reduce(local, group=group, op="sum", timeout=timeout)
    norm = float(local.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


def broadcast_params(params: Sequence[torch.Tensor], transport: Transport, group: CommGroup | None, *, src: int,
                     timeout: float) -> None:
    """Make every replica start from ``src``'s values."""
    if group is None or group.size <= 1 or not params:
        return
    with torch.no_grad():
        flat = _flat([p.detach() for p in params])
        transport.broadcast(flat, src=src, group=group, timeout=timeout)
        _unflat(flat, [p.data for p in params])
