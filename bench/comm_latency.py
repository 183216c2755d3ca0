"""Point-to-point latency and bandwidth: Stagewise's ``DistTransport`` framing vs bare ``torch.distributed``
send/recv on gloo, and the shared-memory ``ShmTransport`` against both.

Run: ``PYTHONPATH=src python bench/comm_latency.py [--rounds 2000] [--repeats 3]``.

Two gloo processes on 127.0.0.1 (free port from ``stagewise.comm.find_free_port``), one compute thread each
(``OMP_NUM_THREADS=1``), ping-pong ``--rounds`` times per case; a round trip is rank 0's send plus its receive of the
echo, timed on rank 0 with ``time.perf_counter``. Cases:

- ``raw 1KiB`` / ``raw 256KiB``: ``dist.send`` / ``dist.recv`` of a (1, 256) / (64, 1024) float32 tensor (the
  receiver allocates with ``torch.empty`` every round, as a transport must).
- ``stagewise small``: ``isend(values).wait()`` / ``recv()`` of ``[0, 1, 0.001, torch.randn(1, 256)]`` (a
  microbatch index, a step, a scalar and a small activation: the typical pipeline message).
- ``stagewise 256KiB``: the same with ``[torch.randn(64, 1024)]``.
- ``shm small`` / ``shm 256KiB``: the same two messages over ``ShmTransport`` (its gloo group carries the cases
  above, so both run in the same two processes).
- ``gloo 64MiB`` / ``shm 64MiB``: rank 0 sends ``[torch.randn(16, 1024, 1024)]`` (64 MiB) and waits for a one-value
  acknowledgement; bandwidth is 64 MiB over the median of that time (the receiver allocates its tensor every round,
  as a transport must). ``--rounds / 200`` rounds (at least 3).

Cases alternate ``--repeats`` times (this 2-core machine is shared; bursts hit single rounds); each case keeps the
median of its best repeat. Also printed: the median time of the ``isend`` call itself (Python and posting, before the
wait) and of framing the first message in-process (``prepare`` + header + pack, what ``isend`` does before gloo), to
show where the per-message overhead goes.

The line ``comm_latency raw_us=R stagewise_us=S overhead_ratio=S/R`` is the gloo comparison for the small message
(round trip medians, microseconds). The last line is ``comm_latency raw_us=G shm_us=S shm_vs_gloo=S/G
mb64_gbps_shm=X mb64_gbps_gloo=Y``: the shm small round trip against the raw gloo one, and the 64 MiB bandwidths
in GB/s (10^9 bytes/s).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts its thread pool; forked ranks inherit it

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stagewise.comm import find_free_port
from stagewise.launch import spawn

CASES = ("raw 1KiB", "stagewise small", "shm small", "raw 256KiB", "stagewise 256KiB", "shm 256KiB", "gloo 64MiB",
         "shm 64MiB")
_MB64 = 64 * 1024 * 1024


def _values(case: str) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    if case.endswith("small"):
        return [0, 1, 0.001, torch.randn(1, 256, generator=g)]
    if case.endswith("64MiB"):
        return [torch.randn(16, 1024, 1024, generator=g)]
    return [torch.randn(64, 1024, generator=g)]


def _bulk(transport: Any, rounds: int) -> list[float]:
    """Times (s) of ``rounds`` 64 MiB sends, each until the one-value acknowledgement is back, on rank 0."""
    rank, times = transport.rank, []
    values = _values("64MiB")
    for _ in range(rounds):
        t0 = time.perf_counter()
        if rank == 0:
            transport.send(values, dst=1, tag=5, timeout=30.0)
            transport.recv(src=1, tag=6, timeout=30.0)
        else:
            (got,) = transport.recv(src=0, tag=5, timeout=30.0)
            transport.send([got.numel()], dst=0, tag=6, timeout=30.0)
        times.append(time.perf_counter() - t0)
    return times if rank == 0 else []


def _ping_pong(shm: Any, case: str, rounds: int) -> tuple[list[float], list[float]]:
    """Round-trip times (s) of ``rounds`` ping-pongs on rank 0 (empty lists on rank 1), and isend call times (s)."""
    import torch.distributed as dist

    transport = shm if case.startswith("shm") else shm.gloo
    if case.endswith("64MiB"):
        return _bulk(transport, max(3, rounds // 200)), []
    rank = transport.rank
    peer = 1 - rank
    times: list[float] = []
    calls: list[float] = []
    if case.startswith("raw"):
        x = torch.randn(1, 256) if case == "raw 1KiB" else torch.randn(64, 1024)
        for _ in range(rounds):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(x, dst=peer, tag=1)
                y = torch.empty_like(x)
                dist.recv(y, src=peer, tag=2)
            else:
                y = torch.empty_like(x)
                dist.recv(y, src=peer, tag=1)
                dist.send(y, dst=peer, tag=2)
            times.append(time.perf_counter() - t0)
    else:
        values = _values(case)
        for _ in range(rounds):
            t0 = time.perf_counter()
            if rank == 0:
                handle = transport.isend(values, dst=peer, tag=1)
                calls.append(time.perf_counter() - t0)
                handle.wait(10.0)
                got = transport.recv(src=peer, tag=2, timeout=10.0)
            else:
                got = transport.recv(src=peer, tag=1, timeout=10.0)
                transport.isend(got, dst=peer, tag=2).wait(10.0)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            assert len(got) == len(values) and torch.equal(got[-1], values[-1]), "echo does not match what was sent"
    return (times if rank == 0 else []), calls


def _rank(rank: int, world_size: int, port: int, out_dir: str, rounds: int, repeats: int, spin_us: float) -> None:
    from stagewise.comm import ShmTransport

    torch.set_num_threads(1)
    transport = ShmTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=30.0, spin_us=spin_us)
    try:
        best: dict[str, dict[str, float]] = {}
        for case in CASES:  # warm up every path (first messages set up gloo pairs and allocator pools)
            _ping_pong(transport, case, 50 if case.endswith(("small", "KiB")) else 600)
        for _ in range(repeats):
            for case in CASES:
                times, calls = _ping_pong(transport, case, rounds)
                if rank != 0:
                    continue
                med = statistics.median(times) * 1e6
                if case not in best or med < best[case]["rt_us"]:
                    best[case] = {"rt_us": med, "isend_us": statistics.median(calls) * 1e6 if calls else 0.0}
        if rank == 0:
            Path(out_dir, "comm_latency.json").write_text(json.dumps(best))
        transport.barrier(timeout=30.0)
    finally:
        transport.close()


def _encode_us(values: list[Any], n: int = 2000) -> float:
    """Median time (us) of framing one first message in this process: ``prepare`` + header + pack (as ``isend``)."""
    from stagewise.comm._framing import HEADER_SLOTS, prepare

    def frame() -> None:
        p = prepare(values)
        first = torch.empty(HEADER_SLOTS * 8 + p.pack_bytes, dtype=torch.uint8)
        first_np = first.numpy()
        p.write_header(first_np, src=0, tag=1)
        if p.pack_bytes:
            p.write_pack(first, HEADER_SLOTS * 8, first_np)

    torch.set_num_threads(1)
    for _ in range(100):
        frame()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        frame()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="ping-pongs per case and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="alternating passes over all cases; best kept")
    parser.add_argument("--spin-us", type=float, default=100.0,
                        help="how long a shm wait spins before it sleeps (ShmTransport's spin_us)")
    args = parser.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_rank, 2, args=(tmp, args.rounds, args.repeats, args.spin_us), port=find_free_port(), timeout=600,
              preload=("torch", "stagewise.comm"))
        res = json.loads(Path(tmp, "comm_latency.json").read_text())
    gbps = {case: _MB64 / (res[case]["rt_us"] / 1e6) / 1e9 for case in ("gloo 64MiB", "shm 64MiB")}
    for case in CASES:
        if case in gbps:
            print(f"{case:17s} send + ack median {res[case]['rt_us'] / 1e3:7.1f} ms, {gbps[case]:.2f} GB/s")
            continue
        extra = f", isend call {res[case]['isend_us']:.0f} us" if not case.startswith("raw") else ""
        print(f"{case:17s} round trip median {res[case]['rt_us']:7.0f} us{extra}")
    for case in ("stagewise small", "stagewise 256KiB"):
        print(f"framing ({case.split()[1]}) median {_encode_us(_values(case)):.1f} us")
    raw, sw, shm = res["raw 1KiB"]["rt_us"], res["stagewise small"]["rt_us"], res["shm small"]["rt_us"]
    print(f"load average {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    print(f"comm_latency raw_us={raw:.0f} stagewise_us={sw:.0f} overhead_ratio={sw / raw:.3f}")
    sys.stdout.flush()
    print(f"comm_latency raw_us={raw:.0f} shm_us={shm:.1f} shm_vs_gloo={shm / raw:.3f} "
          f"mb64_gbps_shm={gbps['shm 64MiB']:.2f} mb64_gbps_gloo={gbps['gloo 64MiB']:.2f}")


if __name__ == "__main__":
    main()
