"""Live weight updates under load: how long a 1 GiB model takes to switch versions, and what clients feel meanwhile.

Run: ``PYTHONPATH=src python bench/live_update.py [--layers 16 --hidden 4096] [--seconds 10] [--clients 2]``.

The model: ``layers`` x (Linear(hidden, hidden) + ReLU), 16 x 4096 by default: 1.07 GB of float32 weights, served by
one replica of 2 stage workers from a Stagewise checkpoint (each worker reads only its stage's half). Two versions
are written as checkpoints (``step-00000001``, ``step-00000002``, fsynced). While ``--clients`` threads send one-row
requests back to back over HTTP, the service is told to load version 2, then 1 (a rollback), then 2 again
(``POST /v2/repository/models/live_mlp/load``); before each load the new version's files are dropped from the page
cache, so the workers read them from the disk, as after a training run wrote them long ago.

- ``read_s``: median time to read the new version's files from the disk (page cache dropped, sequential reads in
  this process), measured right before each load, under the same traffic: the floor of any load.
- ``swap_s``: median time of a load request, from the POST to its answer: every stage read (and, unless
  ``--verify size``, sha256-verified) its weights in a background thread at a lower CPU priority than the batches,
  and the replica switched between two batches.
- ``failed_requests``: requests not answered 200, over the whole run.
- ``p99_idle_ms`` / ``p99_during_ms``: p99 request latency of the requests sent before any load, and of those in
  flight while a load ran.

Goals (issue #18): swap_s <= 2 x read_s, p99_during <= 3 x p99_idle. Every answer names its version, and the answers
to one fixed input must agree within a version (to 1e-4: batches of other sizes round differently) and differ between
versions (checked; a mismatch fails the run).

Last line: ``live_update swap_s=T failed_requests=F p99_during_ms=P p99_idle_ms=Q``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve()
_ENV = "STAGEWISE_LIVE_BENCH"
"""The model's size travels to the worker processes (which import this file) in this environment variable."""


def _size() -> tuple[int, int]:
    size = json.loads(os.environ.get(_ENV, "{}"))
    return int(size.get("layers", 16)), int(size.get("hidden", 4096))


def _model() -> nn.Sequential:
    layers, hidden = _size()
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*mods)


def live_mlp() -> Any:
    """The bench model (built on the meta device by the service: its weights come from the checkpoint)."""
    from stagewise._spec import ModelSpec

    return ModelSpec(model=_model(), args=(torch.zeros(1, _size()[1]),), name="live_mlp")


def write_version(root: Path, step: int) -> list[Path]:
    """A checkpoint of the model with weights seeded by ``step``, in two parts (one per stage); its files."""
    from stagewise.checkpoint import CheckpointWriter

    torch.manual_seed(step)
    state = {k: v.detach() for k, v in _model().state_dict().items()}
    names = list(state)
    half = len(names) // 2
    writer = CheckpointWriter(root, keep=5)
    for part, keys in (("stage0", names[:half]), ("stage1", names[half:])):
        writer.save_part(step, part=part, tensors={k: state[k] for k in keys})
    writer.commit(step, parts=["stage0", "stage1"])
    return sorted((root / f"step-{step:08d}").glob("*.safetensors"))


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(paths: list[Path]) -> float:
    """Time to read ``paths`` from the disk (page cache dropped first), in 64 MiB reads."""
    drop_cache(paths)
    buf = memoryview(bytearray(64 << 20))
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=10.0, help="idle measurement before the loads")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: the temp folder)")
    ap.add_argument("--verify", default="sha256", choices=["sha256", "size"],
                    help="how the service checks each checkpoint it loads (default: sha256 of every file read)")
    args = ap.parse_args()
    os.environ[_ENV] = json.dumps({"layers": args.layers, "hidden": args.hidden})

    import httpx

    from stagewise.serve import GatewayConfig, PipelineBackend, create_app, serve_app

    root = Path(tempfile.mkdtemp(prefix="stagewise-live-", dir=args.dir))
    backend = None
    try:
        files = {step: write_version(root, step) for step in (1, 2)}
        nbytes = sum(p.stat().st_size for p in files[2])
        quiet_s = read_seconds(files[2])
        print(f"model: {args.layers} x Linear({args.hidden}, {args.hidden}), {nbytes / 1e9:.2f} GB per version; "
              f"read from disk in {quiet_s:.2f} s ({nbytes / quiet_s / 1e9:.2f} GB/s) before serving", flush=True)

        t0 = time.perf_counter()
        backend = PipelineBackend(f"{HERE}:live_mlp", stages=2, replicas=1, max_batch_size=4,
                                  checkpoint=str(root / "step-00000001"), repository=str(root),
                                  startup_timeout_s=600.0, request_timeout_s=120.0, worker_timeout_s=120.0)
        backend.wait_ready(600)
        print(f"serving version 1 after {time.perf_counter() - t0:.1f} s", flush=True)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config(max_delay_ms=2)))
        x = torch.linspace(-1, 1, args.hidden).reshape(1, -1)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, args.hidden],
                            "data": x.flatten().tolist()}]}
        meta_input = backend.metadata().inputs[0].name
        body["inputs"][0]["name"] = meta_input
        records: list[tuple[float, float, int, str, tuple[float, ...]]] = []  # start, end, status, version, head
        stop = threading.Event()

        with serve_app(app) as server:
            url = f"{server.url}/v2/models/live_mlp/infer"

            def client() -> None:
                with httpx.Client(timeout=300) as http:
                    while not stop.is_set():
                        start = time.perf_counter()
                        try:
                            resp = http.post(url, json=body)
                            status = resp.status_code
                            doc = resp.json() if status == 200 else {}
                        except httpx.HTTPError:
                            status, doc = 0, {}
                        head = tuple(doc["outputs"][0]["data"][:4]) if status == 200 else ()
                        records.append((start, time.perf_counter(), status, doc.get("model_version", ""), head))

            threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(2.0)  # warm-up: every bucket's first run
            idle_from = time.perf_counter()
            time.sleep(args.seconds)
            idle_to = time.perf_counter()
            windows: list[tuple[float, float]] = []
            swaps: list[float] = []
            load_url = f"{server.url}/v2/repository/models/live_mlp/load"
            reads: list[float] = []
            for step in (2, 1, 2):
                reads.append(read_seconds(files[step]))  # under the same traffic as the load that follows
                drop_cache(files[step])
                time.sleep(1.0)
                a = time.perf_counter()
                params = {"version": str(step), "verify": args.verify}
                resp = httpx.post(load_url, json={"parameters": params}, timeout=600)
                b = time.perf_counter()
                if resp.status_code != 200:
                    raise SystemExit(f"load of version {step} failed: {resp.text}")
                windows.append((a, b))
                swaps.append(b - a)
                print(f"load of version {step}: {b - a:.2f} s (its files read from disk here: {reads[-1]:.2f} s)",
                      flush=True)
                time.sleep(2.0)
            stop.set()
            for t in threads:
                t.join(300)

        failed = sum(1 for r in records if r[2] != 200)
        idle = [e - s for s, e, st, *_ in records if st == 200 and s >= idle_from and e <= idle_to]
        during = [e - s for s, e, st, *_ in records if st == 200 and any(s < b and e > a for a, b in windows)]
        heads: dict[str, torch.Tensor] = {}  # version -> the answers' first values, one row per answer
        for *_, st, version, head in records:
            if st == 200:
                heads[version] = torch.cat([heads.get(version, torch.empty(0, 4)), torch.tensor([head])])
        spread = {v: float((h - h[0]).abs().max()) for v, h in heads.items()}  # batch sizes round differently
        apart = float((heads["1"][0] - heads["2"][0]).abs().max()) if sorted(heads) == ["1", "2"] else 0.0
        if sorted(heads) != ["1", "2"] or max(spread.values()) > 1e-4 or apart < 1e-3:
            raise SystemExit(f"answers are not one per version: spread within {spread}, apart {apart}")
        swap_s = statistics.median(swaps)
        read_s = statistics.median(reads)
        print(f"requests={len(records)} idle={len(idle)} during={len(during)} read_s={read_s:.2f} "
              f"swap_vs_read={swap_s / read_s:.2f} p99_ratio={p99(during) / p99(idle):.2f}", flush=True)
        print(f"live_update swap_s={swap_s:.2f} failed_requests={failed} p99_during_ms={p99(during) * 1e3:.0f} "
              f"p99_idle_ms={p99(idle) * 1e3:.0f}", flush=True)
    finally:
        if backend is not None:
            backend.shutdown()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
