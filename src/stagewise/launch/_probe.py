"""Measure the links between two real processes on this machine (gloo): latency, bandwidth, all-reduce bandwidth and
latency, and what a transfer costs the two ranks themselves while they compute (as pipeline stages do); plus the
runtime's own overhead per compute action. The results are :class:`~stagewise.plan.LinkMeasurement` data that the
planner reads."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._timing import median_ms, num_threads
from ..comm import DistTransport, LocalHub
from ..plan import Calibration, LinkMeasurement
from ..runtime import PipelineExecutor
from ..schedule import add_communication, build
from ..split import input_leaves, split
from ._optimizer import cache_bytes
from ._spawn import spawn

__all__ = ["calibrate", "measure_action_overhead", "measure_host_links", "measure_links"]

log = logging.getLogger(__name__)


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of ``fn()``: the median of ``repeats`` runs (the caller has warmed every path up)."""
    return median_ms(fn, repeats=repeats, warmup=0)[0] / 1e3


def _busy(seconds: float, work: torch.Tensor) -> None:
    """Compute (one thread) for ``seconds``, as a pipeline stage would between its transfers."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mm(work, work)


def _ping(transport: DistTransport, peer: int, *, leader: bool, tiny: torch.Tensor) -> None:
    """A tiny message to ``peer`` and back (the leader sends first)."""
    expect = [(tuple(tiny.shape), tiny.dtype)]
    if leader:
        transport.send([tiny], dst=peer)
        transport.recv(src=peer, expect=expect)
    else:
        transport.recv(src=peer, expect=expect)
        transport.send([tiny], dst=peer)


def _push(transport: DistTransport, peer: int, *, leader: bool, big: torch.Tensor, tiny: torch.Tensor) -> None:
    """A large message from the leader to ``peer``, a tiny acknowledgement back."""
    if leader:
        transport.send([big], dst=peer)
        transport.recv(src=peer, expect=[(tuple(tiny.shape), tiny.dtype)])
    else:
        transport.recv(src=peer, expect=[(tuple(big.shape), big.dtype)])
        transport.send([tiny], dst=peer)


def _link_of(rtt: float, push_s: float, nbytes: int) -> tuple[float, float]:
    """(bandwidth bytes/s, one-way latency s) from a ping's round trip and a push's time."""
    transfer = max(push_s - rtt, push_s / 2)  # the acknowledgement's round trip is not bandwidth
    return nbytes / transfer, rtt / 2


def _probe_rank(rank: int, world_size: int, port: int, *, out: str, nbytes: int, repeats: int, timeout: float,
                backend: str) -> None:
    """One probing process (module level so that spawn can start it; the keywords come bound by a partial)."""
    torch.set_num_threads(1)
    transport = DistTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=timeout,
                                   backend=backend)
    try:
        peer = 1 - rank
        tiny = torch.zeros(1, dtype=torch.float32, device=transport.device)
        big = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=transport.device)

        def sync() -> None:  # NCCL work completes asynchronously on the GPU
            if transport.device.type == "cuda":
                torch.cuda.synchronize(transport.device)
        ping = functools.partial(_ping, transport, peer, leader=rank == 0, tiny=tiny)
        push = functools.partial(_push, transport, peer, leader=rank == 0, big=big, tiny=tiny)

        def reduce() -> None:
            transport.all_reduce(big)
            sync()

        def reduce_tiny() -> None:
            transport.all_reduce(tiny)
            sync()

        work = torch.randn(64, 64, device=transport.device)
        small = torch.zeros(256, dtype=torch.float32, device=transport.device)  # 1 KiB: a small activation
        expect_small = [((256,), torch.float32)]
        send_s: list[float] = []
        recv_s: list[float] = []

        def busy_transfer() -> None:
            # Both ranks compute; rank 0 posts a transfer mid-way, rank 1 takes it in once its compute is done.
            transport.barrier()
            if rank == 0:
                _busy(0.001, work)
                start = time.perf_counter()
                handle = transport.isend([small], dst=peer)
                send_s.append(time.perf_counter() - start)
                _busy(0.004, work)
                handle.wait()
            else:
                _busy(0.003, work)
                start = time.perf_counter()
                transport.recv(src=peer, expect=expect_small)
                recv_s.append(time.perf_counter() - start)

        # A training step whose parameters, gradients and Adam state (4x the parameters) span about twice the
        # last-level cache, as real models' do: what two cores share then is memory bandwidth.
        torch.manual_seed(rank)
        width = 1024
        hidden = max(256, cache_bytes() // 4 // (4 * 2 * width))
        net = torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width)).to(
            transport.device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        x = torch.randn(32, width, device=transport.device)
        alone_s: list[float] = []
        both_s: list[float] = []

        def train_step() -> None:
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        def shared_compute() -> None:
            # Each rank alone, then both at once; the barriers keep the idle rank out of the way.
            for who in (0, 1, -1):
                transport.barrier()
                if who in (rank, -1):
                    start = time.perf_counter()
                    for _ in range(2):
                        train_step()
                    (both_s if who < 0 else alone_s).append(time.perf_counter() - start)
            transport.barrier()

        for fn in (ping, push, reduce, reduce_tiny, busy_transfer, shared_compute):  # warm up every path once
            fn()
        for times in (send_s, recv_s, alone_s, both_s):
            times.clear()
        transport.barrier()
        rtt = _median_time(ping, 4 * repeats)
        transport.barrier()
        push_s = _median_time(push, repeats)
        transport.barrier()
        reduce_s = _median_time(reduce, repeats)
        transport.barrier()
        tiny_reduce_s = _median_time(reduce_tiny, 4 * repeats)
        for _ in range(4 * repeats):
            busy_transfer()
        for _ in range(2 * repeats):
            shared_compute()
        # rank 1's receive costs and both ranks' compute times travel to rank 0, which writes the result
        costs = torch.tensor([statistics.median(recv_s) if recv_s else 0.0, statistics.median(alone_s),
                              statistics.median(both_s)], dtype=torch.float64, device=transport.device)
        transport.all_reduce(costs)
        if rank == 0:
            bytes_sent = big.numel() * 4
            bandwidth, latency = _link_of(rtt, push_s, bytes_sent)
            # the cost model charges 2 (D-1) latencies on top of the bandwidth term, so take them out here too
            reduce_bw_s = max(reduce_s - 2 * (world_size - 1) * latency, reduce_s / 2)
            result = LinkMeasurement(latency_s=latency, bandwidth=bandwidth,
                                     allreduce_bandwidth=2 * (world_size - 1) / world_size * bytes_sent / reduce_bw_s,
                                     nbytes=bytes_sent, backend=backend,
                                     allreduce_latency_s=tiny_reduce_s / (2 * (world_size - 1)),
                                     send_overhead_s=statistics.median(send_s), recv_overhead_s=float(costs[0]),
                                     contention=max(1.0, float(costs[2] / costs[1])))
            Path(out).write_text(json.dumps(dataclasses.asdict(result)))
        transport.barrier()
    finally:
        transport.close()


def measure_host_links(transport: DistTransport, *, nbytes: int = 4 * 2**20,
                       repeats: int = 5) -> dict[int, tuple[float, float, float]]:
    """Measure the link from rank 0 to every other rank of ``transport`` (one process per host, e.g. started by
    torchrun with ``--nproc-per-node 1``), one peer at a time: on rank 0, ``{rank: (bandwidth bytes/s, latency s,
    all-reduce bus bandwidth bytes/s)}``; ``{}`` on the other ranks. Every rank must call it.

    The all-reduce is timed on its own because it sends both ways at once: on a link with a deep queue (a shaped
    uplink) each direction's acknowledgements wait behind the other's data, and it runs far below one-way speed."""
    rank = transport.rank
    tiny = torch.zeros(1, dtype=torch.float32, device=transport.device)
    big = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=transport.device)
    pairs = {peer: transport.new_group([0, peer]) for peer in range(1, transport.world_size)}  # all, in one order
    out = {}
    for peer, group in pairs.items():
        transport.barrier()
        if rank not in (0, peer):
            continue
        other = peer if rank == 0 else 0
        ping = functools.partial(_ping, transport, other, leader=rank == 0, tiny=tiny)
        push = functools.partial(_push, transport, other, leader=rank == 0, big=big, tiny=tiny)
        ping()
        push()  # warm-up: connections, buffers
        rtt = _median_time(ping, 4 * repeats)
        push_s = _median_time(push, repeats)
        reduce_s = _median_time(functools.partial(transport.all_reduce, big, group=group), repeats)
        if rank == 0:
            bandwidth, latency = _link_of(rtt, push_s, big.numel() * 4)
            # two ranks: the bus carries the tensor's bytes once; the cost model adds 2 ring-step latencies back
            out[peer] = (bandwidth, latency, big.numel() * 4 / max(reduce_s - 2 * latency, reduce_s / 2))
    transport.barrier()
    return out


def measure_action_overhead(*, microbatches: int = 8, repeats: int = 5) -> float:
    """Seconds the pipeline runtime (:class:`stagewise.runtime.PipelineExecutor`) adds to each compute action beyond
    the stage's own forward or backward as :func:`stagewise.split.split` profiles it: a one-unit stage runs a 1F1B
    step of ``microbatches`` (with a loss, as the last stage does) in this process, one thread, and the median F and
    B action times are compared with the unit's profile. Never negative."""
    with num_threads(1):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        x = torch.randn(4, 64)
        sm = split(model, (x,), stages=1, by="time", profile=True, repeats=max(repeats, 5))
        unit = sm.partition.units[0]
        stage = sm.stages[0]
        leaves, names, _ = input_leaves((x,), {})
        inputs = [{n: t for n, t in zip(names, leaves) if n in stage.spec.inputs}] * microbatches
        executor = PipelineExecutor(stages={0: stage}, schedule=add_communication(build("1f1b", ranks=1,
                                                                                          microbatches=microbatches)),
                                    transport=LocalHub(1).transport(0), peers=[0], num_stages=1,
                                    loss_fn=lambda outs, m: outs[0].sum(), record=True)
        times: dict[str, list[float]] = {"F": [], "B": []}
        for rep in range(repeats + 1):
            executor.run(inputs)
            if rep:  # the first step warms up
                for event in executor.timeline:
                    if event.kind in times:
                        times[event.kind].append(event.end - event.start)
        for p in stage.parameters():
            p.grad = None
        extra = [statistics.median(times["F"]) - unit.forward_ms / 1e3,
                 statistics.median(times["B"]) - unit.backward_ms / 1e3]
        return max(0.0, statistics.mean(extra))


def measure_links(*, nbytes: int = 4 * 2**20, repeats: int = 5, timeout: float = 60.0,
                  backend: str = "gloo") -> LinkMeasurement:
    """Spawn two processes on this machine and measure point-to-point latency and bandwidth (``nbytes`` messages),
    all-reduce bandwidth and latency, what a small transfer costs each process while both compute, and how much the
    two slow each other computing at once, each the median of ``repeats`` (or a few times more) timings, over
    ``backend`` (``gloo``: CPU tensors; ``nccl``: one GPU per process, needs two); with gloo also the runtime's
    overhead per compute action (:func:`measure_action_overhead`, in this process). Raises
    :class:`stagewise.comm.SpawnError` if a process fails or ``timeout`` seconds pass, ``KeyboardInterrupt`` on
    SIGINT or SIGTERM (the processes are killed at once)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < 2:
        raise ValueError("backend 'nccl' measures between two GPUs, but fewer than 2 are visible; use 'gloo'")
    if nbytes < 4:
        raise ValueError(f"nbytes must be >= 4 (one float32), got {nbytes}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    with tempfile.TemporaryDirectory(prefix="stagewise-probe-") as tmp:
        out = str(Path(tmp) / "links.json")
        probe = functools.partial(_probe_rank, out=out, nbytes=int(nbytes), repeats=int(repeats),
                                  timeout=float(timeout), backend=backend)
        spawn(probe, 2, timeout=timeout, stoppable=False)
        data = json.loads(Path(out).read_text())
    result = LinkMeasurement(**data)
    if backend == "gloo":  # the runtime's own overhead (CPU); a GPU's launches are asynchronous, so it is not measured
        result.action_overhead_s = measure_action_overhead(repeats=repeats)
    log.info("measured links: %s", result)
    return result


def calibrate(*, nbytes: int = 4 * 2**20, repeats: int = 3, timeout: float = 60.0,
              backend: str = "gloo") -> Calibration:
    """Measure this machine now, quickly (:func:`measure_links` with 3 repeats: a few seconds),
    and say where and when: what ``stagewise plan`` calibrates its cost model with unless a young enough probe file
    is given."""
    start = time.time()
    figures = measure_links(nbytes=nbytes, repeats=repeats, timeout=timeout, backend=backend)
    return Calibration(host=socket.gethostname() or "localhost", measured_at=start, seconds=time.time() - start,
                       figures=figures)
