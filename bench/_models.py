"""Model factories and trace helpers shared by the training benchmarks (``bench/train_*.py``).

The factories are addressed by file path (``bench/_models.py:deep_mlp``) so that Trainer workers import them as a
``MODEL`` string; the weights and data are seeded, so every rank and the torch baseline see the same model and batches.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise._spec import ModelSpec
from stagewise.zoo.basic import Samples, mse_loss, seeded

__all__ = ["MODELS_FILE", "build_deep_mlp", "deep_mlp", "deep_mlp_data", "delivery_ms", "kind_medians", "linear_cuts",
           "load_line", "read_trace", "run_comm"]

MODELS_FILE = str(Path(__file__).resolve())
"""Path of this file, for ``MODEL`` strings such as ``f"{MODELS_FILE}:deep_mlp"``."""


def build_deep_mlp(*, layers: int = 8, hidden: int = 1024, seed: int = 0) -> nn.Sequential:
    """``layers`` x (Linear(hidden, hidden) + ReLU) as one flat ``nn.Sequential``: units ``"0"`` .. ``str(2*layers-1)``;
    the k-th Linear (0-based) is unit ``str(2*k)``."""
    with seeded(seed):
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(hidden, hidden), nn.ReLU()]
        return nn.Sequential(*mods)


def deep_mlp_data(*, n_samples: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic regression pairs: x ~ N(0, 1), y = a fixed random projection of x (so the loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, hidden, generator=g)
    w = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(4321)) / hidden**0.5
    return x, torch.tanh(x @ w)


def deep_mlp(*, layers: int = 8, hidden: int = 1024, batch: int = 8, n_samples: int = 512, seed: int = 0) -> ModelSpec:
    """The benchmark MLP with an MSE loss and ``n_samples`` synthetic samples; ``args`` hold one ``batch``."""
    model = build_deep_mlp(layers=layers, hidden=hidden, seed=seed)
    x, _ = deep_mlp_data(n_samples=batch, hidden=hidden, seed=seed + 1)

    def dataset() -> Samples:
        xs, ys = deep_mlp_data(n_samples=n_samples, hidden=hidden, seed=seed + 2)
        return Samples((xs,), (ys,))

    return ModelSpec(model=model, args=(x,), loss=mse_loss, dataset=dataset, name="deep_mlp")


def linear_cuts(*, layers: int, stages: int) -> list[str]:
    """Unit names to cut before so that each of ``stages`` stages holds ``layers // stages`` Linear+ReLU pairs."""
    if layers % stages:
        raise ValueError(f"{layers} layers do not divide into {stages} equal stages")
    per = layers // stages
    return [str(2 * per * s) for s in range(1, stages)]


def read_trace(trace_dir: str | Path) -> dict[int, list[list[dict[str, Any]]]]:
    """``rank -> steps -> events`` from the ``rank{r}.json`` files a traced Trainer run wrote."""
    out: dict[int, list[list[dict[str, Any]]]] = {}
    for path in Path(trace_dir).glob("rank*.json"):
        data = json.loads(path.read_text())
        out[int(data["rank"])] = data["steps"]
    return out


def kind_medians(steps_by_rank: dict[int, list[list[dict[str, Any]]]], *, skip: int) -> dict[tuple[int, str], float]:
    """Median duration in ms of every (rank, kind) over steps ``skip..``; shows where a step's time goes."""
    acc: dict[tuple[int, str], list[float]] = {}
    for rank, steps in steps_by_rank.items():
        for step in steps[skip:]:
            per: dict[str, float] = {}
            for e in step:
                per[e["kind"]] = per.get(e["kind"], 0.0) + (e["end"] - e["start"]) * 1e3
            for kind, ms in per.items():
                acc.setdefault((rank, kind), []).append(ms)
    return {k: statistics.median(v) for k, v in sorted(acc.items())}


def delivery_ms(steps_by_rank: dict[int, list[list[dict[str, Any]]]], *, skip: int) -> list[float]:
    """In-pipeline latency of every transfer whose receiver was already waiting: the RECV's end minus the end of the
    matching SEND on the other rank (the moment the sender handed the tensor over), in ms, over steps ``skip..``."""
    from stagewise.schedule import Action

    out: list[float] = []
    n_steps = min(len(s) for s in steps_by_rank.values())
    for k in range(skip, n_steps):
        sends: dict[tuple[str, int, int], dict[str, Any]] = {}
        recvs: list[tuple[tuple[str, int, int], dict[str, Any]]] = []
        for steps in steps_by_rank.values():
            for e in steps[k]:
                if e["kind"] in ("SEND_F", "SEND_B", "RECV_F", "RECV_B"):
                    a = Action.parse(e["name"])
                    if a.kind == "SEND_F":
                        sends[("F", a.stage + 1, a.microbatch)] = e
                    elif a.kind == "SEND_B":
                        sends[("B", a.stage - 1, a.microbatch)] = e
                    else:
                        recvs.append(((a.kind[-1], a.stage, a.microbatch), e))
        for key, recv in recvs:
            send = sends.get(key)
            if send is not None and recv["start"] <= send["end"]:
                out.append((recv["end"] - send["end"]) * 1e3)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Where the time goes: one boundary transfer, Stagewise's transport vs a bare gloo isend/irecv, as a ping-pong.


def _comm_rank(rank: int, world_size: int, port: int, out_dir: str, rounds: int, rows: int, hidden: int) -> None:
    import torch.distributed as dist

    from stagewise.comm import DistTransport

    torch.set_num_threads(1)
    transport = DistTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=30.0)
    try:
        x = torch.randn(rows, hidden)
        result: dict[str, float] = {}
        for name in ("gloo", "stagewise") * 2:  # twice, alternating: the second pass of each is kept
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                if name == "stagewise":
                    if rank == 0:
                        transport.isend([x], dst=1, tag=1).wait(10.0)
                        transport.recv(src=1, tag=2, timeout=10.0)
                    else:
                        got = transport.recv(src=0, tag=1, timeout=10.0)
                        transport.isend(got, dst=0, tag=2).wait(10.0)
                else:
                    y = torch.empty_like(x)
                    if rank == 0:
                        dist.isend(x, dst=1, tag=1).wait()
                        dist.irecv(y, src=1, tag=2).wait()
                    else:
                        dist.irecv(y, src=0, tag=1).wait()
                        dist.isend(y, dst=0, tag=2).wait()
                times.append(time.perf_counter() - t)
            result[name] = statistics.median(times) * 1e3
        if rank == 0:
            Path(out_dir, "comm.json").write_text(json.dumps(result))
    finally:
        transport.close()


def run_comm(out_dir: Path, *, rows: int, hidden: int, rounds: int = 300) -> dict[str, float]:
    """Median round trip (ms) of one (rows, hidden) fp32 tensor between 2 gloo processes: ``{"gloo", "stagewise"}``."""
    from stagewise.launch import spawn

    spawn(_comm_rank, 2, args=(str(out_dir), rounds, rows, hidden), timeout=120,
          preload=("torch", "stagewise.comm"))
    return dict(json.loads((Path(out_dir) / "comm.json").read_text()))


def load_line() -> str:
    """The machine's load average (benchmarks on a shared 2-core machine are only as quiet as it is)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min) on {os.cpu_count()} cores"
