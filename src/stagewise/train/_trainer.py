"""``Trainer``: run training on local processes (the embedded default) or as one rank under torchrun."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..comm import DistTransport, spawn
from ._config import TrainConfig
from ._device import DevicePlan, plan_devices
from ._worker import run_worker

__all__ = ["Trainer", "TrainResult", "under_torchrun"]

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    """True when this process was started by torchrun (it sets the rendezvous environment)."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@dataclasses.dataclass
class TrainResult:
    """What a finished run left: per-step losses and the final weights by FQN."""

    losses: list[float]
    steps_per_s: float
    out_dir: Path

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights of every stage, keyed by the original model's FQNs."""
        from safetensors.torch import load_file

        merged: dict[str, torch.Tensor] = {}
        for path in sorted(self.out_dir.glob("stage*.safetensors")):
            merged.update(load_file(str(path)))
        return merged

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the trained weights into a freshly built model; tied weights are saved once, under their first name."""
        missing, unexpected = model.load_state_dict(self.state_dict(), strict=False)
        if unexpected:
            raise ValueError(f"weights not in the model: {unexpected[:5]}")
        tied = {name for name, _ in model.named_parameters()}  # named_parameters() lists a tied weight once
        really_missing = [k for k in missing if k in tied or k in dict(model.named_buffers())]
        if really_missing:
            raise ValueError(f"the run saved no weights for {really_missing[:5]}")
        return model


def _ranks_on_host(config: TrainConfig) -> int:
    """Training processes on this host: all of them when spawned here; torchrun's ``LOCAL_WORLD_SIZE`` under it."""
    if under_torchrun():
        return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ["WORLD_SIZE"])
    return config.world_size


# Imported once by the forkserver so that every rank starts without re-importing them.
_PRELOAD = ("torch", "torch.export", "torch._dynamo", "stagewise.train._worker", "stagewise.comm")


def _local_rank_main(rank: int, world_size: int, port: int, config_json: str, backend: str = "gloo",
                     device: str = "cpu") -> None:
    config = TrainConfig.from_json(config_json)
    transport = DistTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=config.runtime.timeout,
                                   backend=backend, device=None if device == "cpu" else device)
    try:
        run_worker(config, transport)
    finally:
        transport.close()


class Trainer:
    """Train ``config.model`` split into ``config.layout.stages`` x ``config.layout.replicas`` processes.

    :attr:`devices` says where they compute and how they talk (logged at INFO): on the CPU over gloo; with
    ``device`` cuda over NCCL when every rank on the host has a GPU of its own, else over gloo with CUDA tensors staged
    through pinned host memory (ranks sharing a GPU: NCCL refuses them).
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.devices: DevicePlan = plan_devices(config.runtime.device, _ranks_on_host(config))
        """The device and backend decision for this run (see :func:`~stagewise.train._device.choose_backend`)."""

    def fit(self, *, timeout: float | None = None) -> TrainResult:
        """Spawn the processes on this machine (or, under torchrun, run this rank) and wait for them."""
        config, plan = self.config, self.devices
        log.info("training %s: %s", config.model, plan.describe())
        device = None if plan.device == "cpu" else plan.device
        if under_torchrun():  # every rank runs this; out_dir, if any, must be a path all ranks share
            transport = DistTransport.from_env(backend=plan.backend, timeout=config.runtime.timeout, device=device)
            try:
                summary = run_worker(config, transport)
            finally:
                transport.close()
            return TrainResult(losses=summary["losses"], steps_per_s=summary["steps_per_s"],
                               out_dir=Path(config.output.out_dir or "."))
        if config.output.out_dir is None:
            config = dataclasses.replace(config, out_dir=tempfile.mkdtemp(prefix="stagewise-train-"))
        # Ranks share cores: one compute thread each, and OpenMP threads that sleep instead of spinning while a rank
        # waits for its neighbour. Read when the forkserver first imports torch, so set before the first spawn.
        os.environ.setdefault("OMP_NUM_THREADS", str(config.runtime.threads))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        wait_s = config.runtime.timeout
        budget = timeout if timeout is not None else max(120.0, 60.0 + 5.0 * config.steps * wait_s / 30.0)
        spawn(_local_rank_main, config.world_size, args=(config.to_json(), plan.backend, plan.device), timeout=budget,
              preload=_PRELOAD)
        out = Path(config.output.out_dir or ".")
        summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
        return TrainResult(losses=summary["losses"], steps_per_s=summary["steps_per_s"], out_dir=out)
