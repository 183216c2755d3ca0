"""Measure the links between two real processes on this machine (gloo): latency, bandwidth, all-reduce bandwidth."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..comm import DistTransport, spawn
from ._cluster import Cluster

__all__ = ["LinkMeasurement", "measure_links", "apply_measurement"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class LinkMeasurement:
    """What :func:`measure_links` measured between two processes."""

    latency_s: float
    """One-way seconds for a tiny message (half the median ping-pong round trip)."""
    bandwidth: float
    """Point-to-point bytes per second for a large message (latency removed)."""
    allreduce_bandwidth: float
    """Ring all-reduce bus bandwidth, bytes per second: ``2 (D-1)/D * bytes / seconds`` with D = 2 (latencies
    taken out, as :func:`~stagewise.plan.allreduce_time` adds them back)."""
    nbytes: int
    """Size of the large message and of the all-reduced tensor."""
    backend: str = "gloo"
    """torch.distributed backend used."""


def _median_time(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _probe_rank(rank: int, world_size: int, port: int, out: str, nbytes: int, repeats: int, timeout: float,
                backend: str) -> None:
    """One probing process (module level so that spawn can start it)."""
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
        expect_tiny = [((1,), torch.float32)]
        expect_big = [(tuple(big.shape), torch.float32)]

        def ping() -> None:  # rank 0 sends, rank 1 answers
            if rank == 0:
                transport.send([tiny], dst=peer)
                transport.recv(src=peer, expect=expect_tiny)
            else:
                transport.recv(src=peer, expect=expect_tiny)
                transport.send([tiny], dst=peer)

        def push() -> None:  # a large message out, a tiny acknowledgement back
            if rank == 0:
                transport.send([big], dst=peer)
                transport.recv(src=peer, expect=expect_tiny)
            else:
                transport.recv(src=peer, expect=expect_big)
                transport.send([tiny], dst=peer)

        def reduce() -> None:
            transport.all_reduce(big)
            sync()

        for fn in (ping, push, reduce):  # warm up every path once
            fn()
        transport.barrier()
        rtt = _median_time(ping, 4 * repeats)
        transport.barrier()
        push_s = _median_time(push, repeats)
        transport.barrier()
        reduce_s = _median_time(reduce, repeats)
        if rank == 0:
            latency = rtt / 2
            bytes_sent = big.numel() * 4
            transfer = max(push_s - rtt, push_s / 2)  # the acknowledgement's round trip is not bandwidth
            # the cost model charges 2 (D-1) latencies on top of the bandwidth term, so take them out here too
            reduce_bw_s = max(reduce_s - 2 * (world_size - 1) * latency, reduce_s / 2)
            result = LinkMeasurement(latency_s=latency, bandwidth=bytes_sent / transfer,
                                     allreduce_bandwidth=2 * (world_size - 1) / world_size * bytes_sent / reduce_bw_s,
                                     nbytes=bytes_sent, backend=backend)
            Path(out).write_text(json.dumps(dataclasses.asdict(result)))
        transport.barrier()
    finally:
        transport.close()


def measure_links(*, nbytes: int = 4 * 2**20, repeats: int = 5, timeout: float = 60.0,
                  backend: str = "gloo") -> LinkMeasurement:
    """Spawn two processes on this machine and measure point-to-point latency and bandwidth (``nbytes`` messages)
    and all-reduce bandwidth, each the median of ``repeats`` timings, over ``backend`` (``gloo``: CPU tensors;
    ``nccl``: one GPU per process, needs two). Raises :class:`stagewise.comm.SpawnError` if a process fails or
    ``timeout`` seconds pass."""
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
        spawn(_probe_rank, 2, args=(out, int(nbytes), int(repeats), float(timeout), backend), timeout=timeout)
        data = json.loads(Path(out).read_text())
    result = LinkMeasurement(**data)
    log.info("measured links: %s", result)
    return result


def apply_measurement(cluster: Cluster, measured: LinkMeasurement) -> Cluster:
    """``cluster`` with its intra-node links and all-reduce bandwidth replaced by ``measured``. Inter-node links
    cannot be measured from one machine; they are kept, but made no faster than the measured intra-node link."""
    return dataclasses.replace(cluster, intra_latency=measured.latency_s, intra_bandwidth=measured.bandwidth,
                               allreduce_bandwidth=measured.allreduce_bandwidth,
                               inter_latency=max(cluster.inter_latency, measured.latency_s),
                               inter_bandwidth=min(cluster.inter_bandwidth, measured.bandwidth))
