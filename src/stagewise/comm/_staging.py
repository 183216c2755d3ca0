"""Staging through host memory: how GPU tensors cross a CPU-only backend (gloo) between ranks that share a GPU.

NCCL refuses two ranks on one GPU ("Duplicate GPU detected") and gloo cannot read CUDA memory, so when several ranks
share a GPU :class:`~stagewise.comm.DistTransport` runs gloo on host copies: every CUDA tensor it sends or reduces is
copied into a *pinned* host buffer (``non_blocking``, then one stream synchronisation before gloo reads it), and every
tensor it receives is copied to the rank's GPU. CPU tensors pass through untouched, so on a CPU run these helpers do
nothing at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._framing import Value

__all__ = ["pinned_empty", "to_device", "to_host"]


def pinned_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An empty contiguous host tensor, pinned when CUDA is available (fast, asynchronous copies to and from GPUs)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=torch.cuda.is_available())


def to_host(values: Sequence[Value]) -> list[Value]:
    """``values`` with every non-CPU tensor copied into pinned host memory; ``requires_grad`` flags are kept.

    CPU tensors and scalars are returned as they are (the same objects). Copies are issued ``non_blocking`` and the
    source devices' current streams are synchronised once at the end, so the host bytes are final when this returns.
    """
    out: list[Value] = []
    devices: set[torch.device] = set()
    with torch.no_grad():
        for v in values:
            if not isinstance(v, torch.Tensor) or v.device.type == "cpu":
                out.append(v)
                continue
            host = pinned_empty(v.shape, v.dtype)
            host.copy_(v.detach(), non_blocking=True)
            if v.requires_grad:
                host.requires_grad_(True)
            devices.add(v.device)
            out.append(host)
    for device in devices:
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    return out


def to_device(values: Sequence[Value], device: torch.device) -> list[Value]:
    """``values`` with every tensor not on ``device`` copied there; ``requires_grad`` flags are kept, scalars pass.

    Copies from pinned host memory are asynchronous on ``device``'s current stream; work queued after them on that
    stream sees the data, and torch's pinned-memory allocator keeps the source alive until the copy has run.
    """
    out: list[Value] = []
    with torch.no_grad():
        for v in values:
            if not isinstance(v, torch.Tensor) or v.device == device:
                out.append(v)
                continue
            moved = v.detach().to(device, non_blocking=v.is_pinned())
            if v.requires_grad:
                moved.requires_grad_(True)
            out.append(moved)
    return out
