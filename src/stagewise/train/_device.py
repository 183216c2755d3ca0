"""Where a training run computes: the device setting, the backend decision, and moving stages and batches there.

The decision is a pure function of three numbers (:func:`choose_backend`): NCCL when every rank on the host has a GPU
of its own; otherwise gloo, *staged*: CUDA tensors cross through pinned host memory (see
:mod:`stagewise.comm._staging`), which is what lets two pipeline stages share one GPU (NCCL refuses two ranks on one
GPU with "Duplicate GPU detected", and gloo cannot read CUDA memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

from .._errors import ConfigError
from ._config import DEVICES, TRANSPORTS

__all__ = [
    "DEVICES",
    "DevicePlan",
    "choose_backend",
    "move_stage",
    "plan_devices",
    "resolve_device",
    "strict_fp32",
    "to_device",
]


def resolve_device(setting: str, *, cuda_available: bool | None = None) -> str:
    """``"cpu"`` or ``"cuda"`` for a :attr:`TrainConfig.device` setting (``auto``: cuda when CUDA is available)."""
    if setting not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {setting!r}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if setting == "auto":
        return "cuda" if available else "cpu"
    if setting == "cuda" and not available:
        raise ValueError("device='cuda' but CUDA is not available here; use device='cpu' (or 'auto')")
    return setting


def choose_backend(device_kind: str, gpus_on_host: int, ranks_on_host: int) -> tuple[str, bool]:
    """``(backend, staged)`` for ranks computing on ``device_kind`` with ``ranks_on_host`` of them on this host.

    - cpu: ``("gloo", False)``.
    - cuda with at least one GPU per rank: ``("nccl", False)``, rank r on GPU ``local_rank``.
    - cuda with fewer GPUs than ranks: ``("gloo", True)``, ranks share GPUs (``local_rank % gpus``) and tensors are
      staged through pinned host memory.
    """
    if ranks_on_host < 1:
        raise ValueError(f"ranks_on_host must be >= 1, got {ranks_on_host}")
    if device_kind == "cpu":
        return "gloo", False
    if device_kind != "cuda":
        raise ValueError(f"device_kind must be 'cpu' or 'cuda', got {device_kind!r}")
    if gpus_on_host < 1:
        raise ValueError("device 'cuda' needs at least one GPU on the host, found none; use device='cpu'")
    if gpus_on_host >= ranks_on_host:
        return "nccl", False
    return "gloo", True


@dataclasses.dataclass(kw_only=True, frozen=True)
class DevicePlan:
    """What a run's ranks compute on and how they talk: decided once, logged, kept on :class:`Trainer`."""

    device: str
    """``cpu`` or ``cuda`` (``auto`` resolved)."""
    backend: str
    """torch.distributed backend: ``gloo`` or ``nccl``."""
    staged: bool
    """True when CUDA tensors cross through pinned host memory (gloo with GPUs shared by several ranks)."""
    gpus_on_host: int
    """GPUs visible on this host (0 on a CPU run)."""
    ranks_on_host: int
    """Training processes on this host."""
    transport: str = ""
    """What carries point-to-point messages: ``shm`` (shared-memory rings; collectives on :attr:`backend`), else the
    backend's name (the default)."""

    def __post_init__(self) -> None:
        if not self.transport:
            object.__setattr__(self, "transport", self.backend)

    def describe(self) -> str:
        if self.device == "cpu":
            how = "shared-memory rings (collectives on gloo)" if self.transport == "shm" else "backend gloo"
            return f"device cpu, {how}, {self.ranks_on_host} rank(s)"
        how = "staged through pinned host memory" if self.staged else "one GPU per rank"
        return (f"device cuda, backend {self.backend} ({how}), {self.ranks_on_host} rank(s) on "
                f"{self.gpus_on_host} GPU(s)")


def plan_devices(setting: str, ranks_on_host: int, transport: str = "auto") -> DevicePlan:
    """Resolve ``setting`` and choose the backend for ``ranks_on_host`` ranks on this host; ``transport`` (see
    :attr:`RuntimeConfig.transport`) forces shared memory (CPU only) or gloo (staged on GPUs)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    device = resolve_device(setting)
    if transport == "shm" and device == "cuda":
        raise ConfigError(f"transport 'shm' moves CPU tensors and device {setting!r} means cuda here; use "
                         "--transport auto or --device cpu")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    backend, staged = choose_backend(device, gpus, ranks_on_host)
    if transport == "gloo" and backend == "nccl":
        backend, staged = "gloo", True
    return DevicePlan(device=device, backend=backend, staged=staged, gpus_on_host=gpus, ranks_on_host=ranks_on_host,
                      transport="shm" if transport == "shm" else backend)


def strict_fp32(device: torch.device) -> None:
    """Turn TF32 off on CUDA: the distributed run and its single-process reference must compute in true fp32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def move_stage(stage: Any, device: torch.device) -> None:
    """Move one stage's weights to ``device`` in place (Parameter objects keep their identity, so weights tied
    between stages of one rank stay tied), and point every device literal the capture recorded on the CPU
    (``arange(..., device=cpu)``) at ``device``."""
    module: fx.GraphModule = stage.module
    module.to(device)
    changed = False

    def retarget(value: Any) -> Any:
        nonlocal changed
        if isinstance(value, torch.device) and value.type == "cpu" and value != device:
            changed = True
            return device
        return value

    for node in module.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, retarget)
        node.kwargs = fx.node.map_aggregate(node.kwargs, retarget)
    if changed:
        module.recompile()


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (tensors in tuples, lists and dicts) with every tensor on ``device``; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, tuple):
        items = [to_device(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    return obj
