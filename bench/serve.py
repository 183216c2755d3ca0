"""Benchmark serving a split model: gateway + pipeline overhead, dynamic batching gain, pipeline-parallel gain.

Run: ``PYTHONPATH=src python bench/serve.py``. Every server is a real ``stagewise serve`` process (through the CLI code,
on a free port, stopped with SIGINT) with real stage-worker processes. Clients speak HTTP/1.1 keep-alive with the binary
tensor extension through minimal clients (httpx costs as much CPU per request as the gateway itself, which on a small
machine would measure the client): a blocking socket for one-at-a-time latency, asyncio on uvloop for throughput.

- overhead: one client, one request at a time, a (1, 16384) float32 input (64 KiB) through a Linear stack served by a
  2-stage pipeline, alternating with an in-process forward of the same model; overhead = served latency - in-process
  latency (p50 - p50, and p99 - p50). For scale, the same client against the same gateway with an echo backend (no
  model, no workers) is printed first: what HTTP and the gateway alone cost on this machine.
- the same overhead with ``--transport shm`` (shared-memory rings between the two stages) is printed above the last
  line, for comparison with the default.
- vs_ray_p50: the same overhead model cut in the same two stages, served by Ray Serve on a local Ray cluster (two
  chained deployments: stage 0 is the HTTP ingress and awaits stage 1 through a deployment handle; the request body is
  the raw 64 KiB of floats, cheaper to parse than the KServe request Stagewise gets). Requests alternate between the
  in-process forward, Stagewise and Ray Serve; vs_ray_p50 = Stagewise's added p50 latency / Ray Serve's. Needs
  ``pip install 'ray[serve]'`` (``--no-ray`` or a missing Ray prints ``vs_ray_p50=nan``).
- idle_cpu_pct: CPU time used by the Stagewise server process and every process below it (gateway, forkserver,
  workers) over 5 s without requests, in percent of one core: waiting must not burn a core.
- batching_gain: requests/s at concurrency 32 with dynamic batching (max batch 32) over batch-1 serving (max batch 1),
  2 stages, a weight-bound MLP (one-row requests).
- pipeline_gain: requests/s at concurrency 32 of 2 stages over 1 stage, a compute-heavy Linear stack (8-row requests).

Both servers of a comparison run at once and are measured alternately (ABAB...; median of the ratios), so drifting load
from other processes hits both alike. Every worker runs one torch thread (``--threads 1``), as does the in-process
reference: several OpenMP threads per process oversubscribe a small shared machine (measured here: a 2-thread forward 8x
slower than a 1-thread one while other processes ran), so the 2-stage pipeline uses two cores where 1 stage uses one.

The last line is machine-readable:
``serve overhead_p50_ms=A overhead_p99_ms=B batching_gain=G pipeline_gain=Q vs_ray_p50=V idle_cpu_pct=C``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stagewise._spec import ModelSpec

HERE = Path(__file__).resolve()


def _stack(*sizes: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def overhead_model() -> ModelSpec:
    """64 KiB in, 64 KiB out: Linear(16384, 256) -> 256 -> 16384."""
    torch.manual_seed(0)
    return ModelSpec(model=_stack(16384, 256, 256, 16384), args=(torch.randn(1, 16384),), name="overhead")


def batching_model() -> ModelSpec:
    """Weight-bound at batch 1 (32 MB of weights read per forward), so a batch costs little more than one row."""
    torch.manual_seed(0)
    return ModelSpec(model=_stack(1024, 2048, 2048, 1024), args=(torch.randn(1, 1024),), name="batching")


def heavy_model() -> ModelSpec:
    """Compute-heavy: eight Linear(2048, 2048) layers (requests of 8 rows: ~270 M multiply-adds each)."""
    torch.manual_seed(0)
    return ModelSpec(model=_stack(*[2048] * 9), args=(torch.randn(8, 2048),), name="heavy")


# ------------------------------------------------------------------------------------------------ server process
def _serve_main(argv: list[str]) -> int:
    from stagewise.serve._cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="bench-serve")
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", *argv])
    if args.stages == 0:
        return _echo_main(args.port)
    return int(args.func(args))


def _echo_main(port: int) -> int:
    """The gateway (same app, same uvicorn settings) in front of a backend that returns its input: no model."""
    from stagewise.serve import (
        BatchingConfig,
        GatewayConfig,
        InferenceBackend,
        ModelMetadata,
        TensorMetadata,
        create_app,
        run,
    )

    class Echo(InferenceBackend):
        name, max_batch_size = "overhead", 1

        def metadata(self) -> ModelMetadata:
            spec = TensorMetadata(name="arg0", datatype="FP32", shape=(-1, 16384))
            return ModelMetadata(name=self.name, inputs=(spec,), outputs=(TensorMetadata(
                name="output", datatype="FP32", shape=(-1, 16384)),))

        def ready(self) -> bool:
            return True

        async def infer(self, inputs: dict[str, object]) -> dict[str, object]:
            return {"output": inputs["arg0"]}

    run(create_app([Echo()], config=GatewayConfig(batching=BatchingConfig(max_delay_ms=2))), port=port,
        log_level="warning")
    return 0


def _ray_main(port: int) -> int:
    """Ray Serve on a local Ray cluster, the same overhead model cut in the same two stages as two chained deployments
    (stage 0 is the HTTP ingress and calls stage 1 through a deployment handle, Ray Serve's model composition)."""
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment
    class Stage1:
        def __init__(self) -> None:
            torch.set_num_threads(1)
            self.model = overhead_model().model[2:].eval()

        def __call__(self, h: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return self.model(h)

    @serve.deployment
    class Stage0:
        def __init__(self, following: Any) -> None:
            torch.set_num_threads(1)
            self.model = overhead_model().model[:2].eval()
            self.following = following

        async def __call__(self, request: Request) -> Response:
            x = torch.frombuffer(bytearray(await request.body()), dtype=torch.float32).reshape(1, -1)
            with torch.inference_mode():
                h = self.model(x)
            y = await self.following.remote(h)
            return Response(y.numpy().tobytes(), media_type="application/octet-stream")

    serve.run(Stage0.bind(Stage1.bind()), route_prefix="/overhead", blocking=False)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


class RayServer:
    """Ray Serve (``_ray_main``) in a subprocess; ``None`` from :meth:`start` when Ray Serve is not installed."""

    def __init__(self) -> None:
        from stagewise.comm import find_free_port

        self.port = find_free_port()
        env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent / "src"), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--ray-serve", str(self.port)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

    @staticmethod
    def available() -> bool:
        try:
            import ray.serve  # noqa: F401
        except ImportError:
            return False
        return True

    def __enter__(self) -> RayServer:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in self.proc.stdout:  # Ray prints its own lines first
            if line.strip() == "ready":
                break
            if time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or time.monotonic() > deadline:
            self.__exit__()
            raise RuntimeError("Ray Serve did not start")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # keep its pipe drained
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Server:
    """``stagewise serve`` in a subprocess; stopped with SIGINT like a user's Ctrl-C."""

    def __init__(self, factory: str, *, stages: int, max_batch_size: int, threads: int = 1,
                 transport: str = "auto") -> None:
        from stagewise.comm import find_free_port

        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(HERE), "--serve", f"{HERE}:{factory}", "--stages", str(stages), "--port",
               str(self.port), "--max-batch-size", str(max_batch_size), "--max-delay-ms", "2",
               "--threads", str(threads), "--transport", transport]
        env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent / "src"))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server at {self.url} not ready within {timeout_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------ clients
def _binary_request(name: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": name, "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


class _Conn:
    """A minimal HTTP/1.1 keep-alive client connection: the load generator must cost far less CPU than the server
    (httpx spends milliseconds of CPU per request, as much as the gateway itself)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Conn:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


def _raw_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _throughput(port: int, path: str, x: np.ndarray, concurrency: int, seconds: float) -> float:
    """Requests/s of ``concurrency`` closed-loop clients over ``seconds`` (after a 0.5 s warm-up)."""
    body, headers = _binary_request("arg0", x)
    request = _raw_request(port, path, body, headers)
    conns = [await _Conn.open("127.0.0.1", port) for _ in range(concurrency)]
    done = 0

    async def worker(conn: _Conn, until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            status, _, text = await conn.post(request)
            assert status == 200, text[:500]
            done += 1

    try:
        await asyncio.gather(*(worker(c, time.perf_counter() + 0.5) for c in conns))
        done = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c, t0 + seconds) for c in conns))
        return done / (time.perf_counter() - t0)
    finally:
        for c in conns:
            c.close()


class _BlockingConn:
    """One keep-alive HTTP/1.1 connection on a blocking socket: for one-at-a-time latency, the cheapest client there
    is (an event loop costs the client ~0.1-0.2 ms per request on a small machine, which is not the server's)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._more()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        size = int(headers.get("content-length", "0"))
        while len(rest) < size:
            rest += self._more()
        self.buf = rest[size:]
        return int(lines[0].split()[1]), headers, rest[:size]

    def _more(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def _sequential(requests: list[tuple[int, bytes]], count: int, local: Callable[[], object] | None = None
                ) -> tuple[list[float], list[list[float]]]:
    """``count`` rounds (after 20 warm-up rounds) of one ``local()`` call then one request to each ``(port, raw
    request)`` in turn: the in-process latencies and each server's latencies, measured alternately."""
    conns = [_BlockingConn(port) for port, _ in requests]
    try:
        lats: list[float] = []
        served: list[list[float]] = [[] for _ in requests]
        for i in range(count + 20):
            t0 = time.perf_counter()
            if local is not None:
                local()
            t1 = time.perf_counter()
            times = []
            for conn, (_, request) in zip(conns, requests):
                status, _, content = conn.post(request)
                t2 = time.perf_counter()
                assert status == 200, content[:500]
                times.append(t2 - t1)
                t1 = t2
            if i >= 20:  # warm-up
                lats.append(time.perf_counter() - t0 - sum(times))
                for kept, t in zip(served, times):
                    kept.append(t)
        return lats, served
    finally:
        for conn in conns:
            conn.close()


def _idle_cpu_pct(pid: int, seconds: float) -> float:
    """CPU used by ``pid`` and every process below it over ``seconds`` of no requests, in percent of one core."""
    from stagewise._procs import cpu_seconds, descendants

    family = [pid, *descendants(pid)]
    before = sum(cpu_seconds(p) for p in family)
    time.sleep(seconds)
    return (sum(cpu_seconds(p) for p in family) - before) / seconds * 100


def measure_overhead(requests: int, *, ray: bool) -> dict[str, float]:
    """Alternate one in-process forward, one request to Stagewise (stages on gloo, the default), one to Stagewise with
    ``--transport shm`` and (with ``ray``) one to Ray Serve, so all see the same machine load; then Stagewise's idle
    CPU."""
    model = overhead_model().model.eval()
    torch.set_num_threads(1)
    x = np.random.default_rng(0).standard_normal((1, 16384)).astype(np.float32)
    body, headers = _binary_request("arg0", x)
    path = "/v2/models/overhead/infer"

    def forward() -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    want = forward().numpy()
    with Server("overhead_model", stages=2, max_batch_size=1) as server, \
            Server("overhead_model", stages=2, max_batch_size=1, transport="shm") as shm_server, \
            (RayServer() if ray else contextlib.nullcontext()) as ray_server:
        targets = [(s.port, _raw_request(s.port, path, body, headers)) for s in (server, shm_server)]
        if ray_server is not None:
            targets.append((ray_server.port, _raw_request(ray_server.port, "/overhead", x.tobytes(),
                                                          {"Content-Type": "application/octet-stream"})))
        for port, request in targets:
            conn = _BlockingConn(port)
            status, head, content = conn.post(request)
            conn.close()
            assert status == 200, content[:500]
            n = int(head.get("inference-header-content-length", 0))
            got = np.frombuffer(content[n:], dtype=np.float32).reshape(1, -1)
            assert np.allclose(got, want, atol=1e-4), f"served output differs by {np.abs(got - want).max()}"
        local, served = _sequential(targets, requests, forward)
        time.sleep(1.0)
        idle = _idle_cpu_pct(server.proc.pid, 5.0)
    local_p50 = statistics.median(local)
    out = {"idle_cpu_pct": idle}
    for name, lats in zip(("stagewise", "stagewise_shm", "ray"), served):
        q = statistics.quantiles(lats, n=100)
        print(f"overhead: in-process p50 {local_p50 * 1e3:.2f} ms; {name} served (2 stages) p50 "
              f"{statistics.median(lats) * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms ({requests} sequential requests, "
              "64 KiB in and out)")
        out[f"{name}_p50"] = (statistics.median(lats) - local_p50) * 1e3
        out[f"{name}_p99"] = (q[98] - local_p50) * 1e3
    print(f"idle: gateway and workers used {idle:.2f}% of one core over 5 s without requests")
    return out


def measure_http_floor(requests: int) -> None:
    """For scale: the same client, gateway and request against a backend that does nothing (no worker processes)."""
    with Server("overhead_model", stages=0, max_batch_size=1) as server:
        request = _raw_request(server.port, "/v2/models/overhead/infer", *_binary_request(
            "arg0", np.zeros((1, 16384), dtype=np.float32)))
        _, (served,) = _sequential([(server.port, request)], requests)
    q = statistics.quantiles(served, n=100)
    print(f"http floor (gateway with an echo backend, no model, no workers): p50 {statistics.median(served) * 1e3:.2f} "
          f"ms, p99 {q[98] * 1e3:.2f} ms")


def _run(coro: Coroutine[Any, Any, float]) -> float:
    """Run the load generator on uvloop when it is there: the client's CPU is taken from the servers' two cores."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def compare_rps(factory: str, name: str, x: np.ndarray, a: dict[str, int], b: dict[str, int], *, seconds: float,
                rounds: int = 3) -> float:
    """Median over ``rounds`` of rps(a) / rps(b), both servers up at once and measured alternately (ABAB...)."""
    path = f"/v2/models/{name}/infer"
    with Server(factory, **a) as sa, Server(factory, **b) as sb:
        ratios = []
        for r in range(rounds):
            ra = _run(_throughput(sa.port, path, x, 32, seconds))
            rb = _run(_throughput(sb.port, path, x, 32, seconds))
            ratios.append(ra / rb)
            print(f"{name} round {r}: {a} {ra:.1f} requests/s, {b} {rb:.1f} requests/s at concurrency 32")
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential requests for the overhead")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per comparison")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Serve side of the overhead")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores shared by every server and client process; load average "
          f"{os.getloadavg()[0]:.1f}")
    measure_http_floor(args.requests)
    ray = RayServer.available() and not args.no_ray
    if not ray:
        print("Ray Serve is not installed (pip install 'ray[serve]') or --no-ray: vs_ray_p50 is not measured")
    over = measure_overhead(args.requests, ray=ray)
    rng = np.random.default_rng(1)
    gain = compare_rps("batching_model", "batching", rng.standard_normal((1, 1024)).astype(np.float32),
                       {"stages": 2, "max_batch_size": 32}, {"stages": 2, "max_batch_size": 1}, seconds=args.seconds,
                       rounds=args.rounds)
    pipe = compare_rps("heavy_model", "heavy", rng.standard_normal((8, 2048)).astype(np.float32),
                       {"stages": 2, "max_batch_size": 32}, {"stages": 1, "max_batch_size": 32}, seconds=args.seconds,
                       rounds=args.rounds)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    vs_ray = f"{over['stagewise_p50'] / over['ray_p50']:.2f}" if ray else "nan"
    print(f"serve overhead_p50_ms={over['stagewise_p50']:.2f} overhead_p99_ms={over['stagewise_p99']:.2f} "
          f"batching_gain={gain:.2f} pipeline_gain={pipe:.2f} vs_ray_p50={vs_ray} "
          f"idle_cpu_pct={over['idle_cpu_pct']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sys.exit(_serve_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--ray-serve":
        sys.exit(_ray_main(int(sys.argv[2])))
    main()
