"""``Trainer``: run training on local processes (the embedded default) or as one rank under torchrun."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._errors import ConfigError
from .._spec import ModelSpec, import_model_code
from ..comm import DistTransport, ShmTransport, Transport
from ..launch import TorchrunEnv, connect_torchrun, ray_spawn, rendezvous_host, spawn, stop_requested
from ..plan import Plan
from ..split import StagePack, materialise, tensor_aliases
from ._config import TrainConfig
from ._device import DevicePlan, plan_devices
from ._plan_check import PlanCheck, measured_step_s
from ._rank import Layout, load_train_spec, rank_packs, weights_path
from ._recovery import resume_after_torchrun_restart, run_with_restarts
from ._shared_split import shared_pack
from ._worker import run_worker

__all__ = ["TrainResult", "Trainer"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    """What a finished run left: per-step losses and the final weights by FQN."""

    losses: list[float]
    steps_per_s: float
    out_dir: Path | None
    """Where the weights were written; None when no ``out_dir`` was set (the weights are then kept in memory)."""
    stopped_by: int | None = None
    """The signal (SIGINT, SIGTERM) that stopped the run early, None when it ran every step."""
    last_step: int | None = None
    """The optimizer step the run ended after."""
    weights: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)
    """The final weights, when the run wrote them to a temporary folder (read, then removed)."""
    memory: list[dict[str, int]] = dataclasses.field(default_factory=list)
    """Per rank, the bytes it measured on its first step: ``weights``, ``gradients``, ``optimizer`` state and peak
    saved ``activations`` (what :class:`stagewise.plan.Plan` predicts per pipeline rank)."""
    restarts: int = 0
    """How often the run restarted from a snapshot after a rank died or hung (``--max-restarts``)."""
    failures: list[str] = dataclasses.field(default_factory=list)
    """The cause of each restart, in order: the rank and what happened to it."""
    step_s: list[float] = dataclasses.field(default_factory=list)
    """Wall seconds of each step the last attempt made (rank 0's: from the step's start to its loss all-reduce)."""
    plan_check: PlanCheck | None = None
    """With a plan (``Trainer(config, plan=...)``, ``stagewise train --plan``): its predicted step time and memory
    next to the measured ones, and the warnings for large misses."""

    @property
    def step_time_s(self) -> float | None:
        """The median step time after the warm-up steps (:data:`~stagewise.train._plan_check.WARMUP_STEPS`)."""
        return measured_step_s(self.step_s)

    @property
    def stop_reason(self) -> str | None:
        """``"SIGTERM"`` or ``"SIGINT"`` when a signal stopped the run, else None."""
        return None if self.stopped_by is None else signal.Signals(self.stopped_by).name

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights of every stage, keyed by the original model's FQNs."""
        from safetensors.torch import load_file

        if self.weights is not None:
            return dict(self.weights)
        merged: dict[str, torch.Tensor] = {}
        assert self.out_dir is not None
        for path in sorted(self.out_dir.glob("stage*.safetensors")):
            merged.update(load_file(str(path)))
        return merged

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the trained weights into a freshly built model (also one built on the meta device); tied weights are
        saved once, under their first name."""
        state = self.state_dict()
        on_meta = [name for name, p in model.named_parameters() if p.is_meta and name in state]
        if on_meta:
            materialise(model, on_meta, values=state)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"weights not in the model: {unexpected[:5]}")
        tied = {name for name, _ in model.named_parameters()}  # named_parameters() lists a tied weight once
        really_missing = [k for k in missing if k in tied or k in dict(model.named_buffers())]
        if really_missing:
            raise ValueError(f"the run saved no weights for {really_missing[:5]}")
        return model




# Imported once by the forkserver so that every rank starts without re-importing them.
_PRELOAD = ("torch", "torch.export", "torch._dynamo", "stagewise.train._worker", "stagewise.comm")


def _local_rank_main(rank: int, world_size: int, port: int, config_json: str, backend: str = "gloo",
                     device: str = "cpu", kind: str = "gloo", packs: dict[int, bytes] | None = None) -> None:
    config = TrainConfig.from_json(config_json)
    # This rank's stages as the launcher split them, as data (StagePack.to_bytes): the rank does not capture the model.
    assert packs is not None, "the launcher hands every rank its stages"
    trusted = import_model_code(config.model)  # custom operators the graphs call; the model's own output classes
    pack = StagePack.from_bytes(packs[Layout(config).place(rank)[1]], trusted_modules=trusted)
    timeout = config.runtime.timeout
    transport: Transport
    host = rendezvous_host()
    if kind == "shm":
        transport = ShmTransport.init(rank=rank, world_size=world_size, master_addr=host, master_port=port,
                                      timeout=timeout)
    else:
        transport = DistTransport.init(rank=rank, world_size=world_size, master_addr=host, master_port=port,
                                       timeout=timeout, backend=backend, device=None if device == "cpu" else device)
    try:
        run_worker(config, transport, pack=pack, should_stop=stop_requested)
    finally:
        transport.close()


class Trainer:
    """Train ``config.model`` split into ``config.layout.stages`` x ``config.layout.replicas`` processes.

    :attr:`devices` says where they compute and how they talk (logged at INFO): on the CPU over gloo; with
    ``device`` cuda over NCCL when every rank on the host has a GPU of its own, else over gloo with CUDA tensors staged
    through pinned host memory (ranks sharing a GPU: NCCL refuses them).

    ``torchrun`` (from :func:`stagewise.launch.torchrun_env`) makes this process the one rank torchrun started;
    without it the ranks are spawned here. With ``max_restarts`` a local run outlives ranks that die or hang: every
    rank is stopped and the run goes on from its newest snapshot (see :mod:`stagewise.train._recovery`). Locally,
    SIGINT or SIGTERM of this process stops every rank at the next step boundary (saving a checkpoint there when
    ``save_dir`` is set): :attr:`TrainResult.stopped_by` says so.
    """

    def __init__(self, config: TrainConfig, *, torchrun: TorchrunEnv | None = None, plan: Plan | None = None) -> None:
        self.config = config
        self.torchrun = torchrun
        self.plan = plan
        """The plan the run follows (its layout already in ``config``): the result checks it (``plan_check``)."""
        on_host = config.world_size if torchrun is None else torchrun.local_world_size
        if torchrun is not None and config.runtime.transport == "shm":
            raise ConfigError("transport 'shm' runs on the local processes Stagewise starts, not under torchrun "
                              "(yet); use --transport auto or gloo")
        self.devices: DevicePlan = plan_devices(config.runtime.device, on_host, config.runtime.transport)
        """The device and backend decision for this run (see :func:`~stagewise.train._device.choose_backend`)."""
        self._packs: dict[int, bytes] | None = None

    def check(self) -> ModelSpec:
        """Build the model, read one microbatch and cut it as the ranks will, here and once: a failing factory, a
        data set too small or more stages than units is one error before any process starts (not one per rank after
        they all started). Returns the model's spec (its untrained model). The cut is kept: each rank gets its own
        stages from it, without weights, and never captures the model itself."""
        config = self.config
        spec = load_train_spec(config)  # on the meta device when the ranks build it there: no full copy here either
        self._packs = {p: pack.to_bytes() for p, pack in rank_packs(config, spec).items()}
        weights = weights_path(config)
        if weights is not None:  # every tensor there with the right shape (headers only; no tensor is read)
            from ..weights import open_weights

            open_weights(weights).verify(dict(spec.model.named_parameters()), aliases=tensor_aliases(spec.model))
        return spec

    def fit(self, *, timeout: float | None = None) -> TrainResult:
        """Spawn the processes on this machine (or, under torchrun, run this rank) and wait for them."""
        config, plan = self.config, self.devices
        log.info("training %s: %s", config.model, plan.describe())
        device = None if plan.device == "cpu" else plan.device
        if self.torchrun is not None:  # every rank runs this; out_dir, if any, must be a path all ranks share
            if config.recovery.max_restarts:
                raise ConfigError("--max-restarts restarts ranks this process spawned; under torchrun use torchrun's "
                                  "own --max-restarts with --save DIR --save-every K (a restarted rank resumes from "
                                  "the newest checkpoint in DIR)")
            config = resume_after_torchrun_restart(config)
            if config.output.serve_url and config.output.push_dir is None:
                raise ConfigError("under torchrun every rank writes its pushed weights to one folder: give it with "
                                  "--push-dir DIR")
            transport = connect_torchrun(self.torchrun, backend=plan.backend, timeout=config.runtime.timeout,
                                         device=device, iface=config.runtime.iface)
            try:  # rank 0 splits the model for every rank, through the rendezvous store
                summary = run_worker(config, transport, pack=shared_pack(config, transport.store, self.torchrun.rank))
            finally:
                transport.close()
            return self._checked(TrainResult(losses=summary["losses"], steps_per_s=summary["steps_per_s"],
                                             out_dir=Path(config.output.out_dir or "."),
                                             last_step=summary["last_step"], memory=summary["memory"],
                                             step_s=summary["step_s"]))
        scratch = snapshots = None
        if config.output.serve_url and config.output.push_dir is None:  # one folder every rank of this run shares
            from ._push import default_push_dir

            config = dataclasses.replace(config, push_dir=str(default_push_dir(secrets.token_hex(4))))
        if config.output.out_dir is None:  # the ranks hand the weights over in files; read, then removed below
            scratch = tempfile.mkdtemp(prefix="stagewise-train-")
            config = dataclasses.replace(config, out_dir=scratch)
        if config.recovery.max_restarts and config.recovery.snapshot_dir is None:
            if config.output.save_dir is None:  # a folder of this run's own
                snapshots = tempfile.mkdtemp(prefix="stagewise-snapshots-")
            config = dataclasses.replace(config, snapshot_dir=snapshots or config.output.save_dir)
        # Ranks share cores: one compute thread each, and OpenMP threads that sleep instead of spinning while a rank
        # waits for its neighbour. Read when the forkserver first imports torch, so set before the first spawn.
        os.environ.setdefault("OMP_NUM_THREADS", str(config.runtime.threads))
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        wait_s = config.runtime.timeout
        budget = timeout if timeout is not None else max(120.0, 60.0 + 5.0 * config.steps * wait_s / 30.0)
        # After SIGINT/SIGTERM the ranks finish their step, agree to stop, maybe save: a step and a save's waits.
        grace = 30.0 + 3 * wait_s
        heartbeat = config.recovery.heartbeat_timeout if config.recovery.max_restarts else None

        if self._packs is None:
            self.check()

        def launch(attempt: TrainConfig) -> int | None:
            args = (attempt.to_json(), plan.backend, plan.device, plan.transport, self._packs)
            if config.runtime.launcher == "ray":
                return ray_spawn(_local_rank_main, attempt.world_size, args=args, timeout=budget, stop_grace=grace)
            return spawn(_local_rank_main, attempt.world_size, args=args, timeout=budget, preload=_PRELOAD,
                         stop_grace=grace, heartbeat=heartbeat)

        try:
            stopped, restarts = run_with_restarts(launch, config, snapshots=Path(config.recovery.snapshot_dir or "."))
            out = Path(config.output.out_dir or ".")
            summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
            # the steps before the last restart, as the snapshots kept them, then the last attempt's
            losses = restarts.losses_before(summary["start_step"]) + summary["losses"]
            result = TrainResult(losses=losses, steps_per_s=summary["steps_per_s"], out_dir=out,
                                 stopped_by=stopped, last_step=summary.get("last_step"),
                                 memory=summary.get("memory", []), restarts=len(restarts.causes),
                                 failures=restarts.causes, step_s=summary.get("step_s", []))
            self._checked(result)
            if scratch is not None:
                result.weights, result.out_dir = result.state_dict(), None
            return result
        finally:
            for folder in (scratch, snapshots):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)

    def _checked(self, result: TrainResult) -> TrainResult:
        """``result`` with the plan's predictions checked against it (written to ``out_dir/plan_check.json`` when
        the run keeps its outputs)."""
        if self.plan is not None:
            result.plan_check = PlanCheck.of(self.plan, step_s=result.step_s, memory=result.memory)
            out = self.config.output.out_dir
            if result.plan_check is not None and out is not None and (self.torchrun is None or
                                                                      self.torchrun.rank == 0):
                result.plan_check.write(Path(out) / "plan_check.json")
        return result
