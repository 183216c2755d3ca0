"""The serving side under hostile and unlucky conditions (issue #19): file-descriptor exhaustion, idle and slow HTTP
clients, forged and trickling worker-channel peers, a dead forkserver, a stopped worker, a model raising on one
request, SIGTERM. Real processes, real HTTP, small timeouts so that each case takes seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing.forkserver
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stagewise._procs import descendants, running
from stagewise.serve import GatewayConfig, GatewayMetrics, LocalBackend, ModelError, create_app, serve_app
from stagewise.serve._batching import BatchingConfig, DynamicBatcher
from stagewise.serve._channel import PREFIX, Channel, encode_frame
from stagewise.serve._listener import ChannelListener, HelloFields, client_handshake
from stagewise.serve._pipeline import PipelineBackend

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and rlimits")]

MLP = "stagewise.zoo.basic:mlp"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}


def _wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def _trickle_until_closed(sock: socket.socket, byte: bytes, every_s: float, why: str, limit_s: float = 5.0) -> None:
    """Send ``byte`` every ``every_s`` until the peer closes ``sock``; fails with ``why`` after ``limit_s``."""
    t0 = time.monotonic()
    while not _closed_by_peer(sock):
        assert time.monotonic() - t0 < limit_s, why
        try:
            sock.send(byte)
        except OSError:
            break
        time.sleep(every_s)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (what it sent before is read and dropped)."""
    try:
        while sock.recv(4096, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _refused(sock: socket.socket) -> bool:
    """Whether the peer closes ``sock`` within 3 s without sending anything more."""
    sock.settimeout(3)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _mlp_body(rows: int = 1) -> dict:
    x = np.random.default_rng(0).standard_normal((rows, 64)).astype(np.float32)
    return {"inputs": [{"name": "arg0", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}


# ------------------------------------------------------------------------------------------ worker channel (item 3)
def test_the_worker_channel_authenticates_before_allocating_and_refuses_forgeries() -> None:
    hellos: list[HelloFields] = []
    errors: list[BaseException] = []
    threading.excepthook, old_hook = (lambda a: errors.append(a.exc_value)), threading.excepthook
    listener = ChannelListener("127.0.0.1", "s3cret", lambda sock, who: (hellos.append(who), sock.close()),
                               max_pending=8, hello_timeout_s=1.0)
    try:
        threads = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(20)]  # more than max_pending
        time.sleep(0.3)
        assert threading.active_count() == threads, "an unauthenticated connection must not cost a thread"
        trickle = socket.create_connection(("127.0.0.1", listener.port))
        # one byte at a time never completes a hello: dropped at the deadline
        _trickle_until_closed(trickle, b"\x00", 0.1, "a trickling peer must be dropped after hello_timeout_s")
        _wait_until(lambda: all(_closed_by_peer(s) for s in idle), 5, "idle peers to be evicted or timed out")

        def forged(header: dict) -> bool:
            """Send ``header`` as the hello frame; True when the gateway closed the connection."""
            with socket.create_connection(("127.0.0.1", listener.port)) as s:
                chan = Channel(s)
                assert chan.recv(max_data_bytes=0).kind == "challenge"
                raw = json.dumps(header).encode()  # json writes inf as Infinity
                s.sendall(PREFIX.pack(len(raw), 0) + raw)
                return _refused(s)

        fields = {"kind": "hello", "replica": 0, "generation": 1, "stage": 0, "pid": 1, "mac": "0" * 64}
        assert forged({**fields, "replica": float("inf")})
        assert forged({**fields, "replica": 1e308})
        assert forged({**fields, "stage": True})
        assert forged(fields)  # wrong MAC
        with socket.create_connection(("127.0.0.1", listener.port)) as s:  # a data payload in the hello: refused
            Channel(s).recv(max_data_bytes=0)
            s.sendall(encode_frame({"kind": "hello"}, {"x": torch.zeros(4)}))
            assert _refused(s)
        assert hellos == [] and errors == [] and listener.alive
        with socket.create_connection(("127.0.0.1", listener.port)) as s:  # the real thing
            client_handshake(Channel(s), "s3cret", HelloFields(replica=1, generation=2, stage=0, pid=7), timeout_s=5)
            _wait_until(lambda: bool(hellos), 5, "the authenticated hello")
        assert hellos == [HelloFields(replica=1, generation=2, stage=0, pid=7)]
        for s in idle + [trickle]:
            s.close()
    finally:
        threading.excepthook = old_hook
        listener.close()
    assert not listener.alive


# ------------------------------------------------------------------------- accept errors, forkserver (items 1, 2)
_EMFILE_SCRIPT = """
import os, resource, signal, socket, sys, time
from stagewise.serve._pipeline import PipelineBackend
b = PipelineBackend("stagewise.zoo.basic:mlp", stages=1, replicas=1, max_batch_size=4, restart_backoff_s=0.05,
                    heartbeat_timeout_s=2.0)
b.wait_ready(60)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
client, fill = socket.socket(), []
try:
    while True:
        fill.append(socket.socket())
except OSError:
    pass
client.connect(("127.0.0.1", b._port))  # sits in the backlog: the accept loop meets EMFILE
time.sleep(1.0)
errors = b._listener.accept_errors
for s in fill:
    s.close()
client.close()
pid = b.status()[0].pids[0]
os.kill(pid, signal.SIGKILL)
deadline = time.monotonic() + 40
while not (b.status()[0].generation >= 2 and b.status()[0].state == "ready"):
    assert time.monotonic() < deadline, f"replica never returned: {b.status()}"
    time.sleep(0.05)
print("RECOVERED", errors, b.ready(), flush=True)
b.shutdown()
"""


def test_the_accept_loop_survives_running_out_of_file_descriptors() -> None:
    out = subprocess.run([sys.executable, "-c", _EMFILE_SCRIPT], env=ENV, capture_output=True, text=True, timeout=100,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1].split()
    assert line[0] == "RECOVERED" and int(line[1]) > 0 and line[2] == "True", (line, out.stderr[-2000:])


def test_a_dead_forkserver_neither_kills_healthy_replicas_nor_stops_restarts() -> None:
    backend = PipelineBackend(MLP, stages=1, replicas=2, max_batch_size=4, restart_backoff_s=0.05)
    metrics = GatewayMetrics()
    backend.bind_metrics(metrics)
    try:
        backend.wait_ready(60, replicas=2)
        before = backend.status()
        server_pid = multiprocessing.forkserver._forkserver._forkserver_pid
        assert server_pid is not None and running(server_pid)
        os.kill(server_pid, signal.SIGKILL)
        time.sleep(1.0)  # the old code read exit code 255 for every worker here, and killed them all
        assert [(s.generation, s.state) for s in backend.status()] == [(s.generation, s.state) for s in before]
        os.kill(before[0].pids[0], signal.SIGKILL)
        _wait_until(lambda: backend.status()[0].generation == 2 and backend.status()[0].state == "ready", 60,
                    "replica 0 to come back through a fresh forkserver")
        assert backend.status()[1].generation == 1
        x = torch.randn(2, 64)
        assert asyncio.run(backend.infer({"arg0": x}))["output"].shape[0] == 2
        text = metrics.render()[0].decode()
        assert 'stagewise_replica_restarts_total{model="mlp",replica="0"} 1.0' in text
        assert 'stagewise_replica_ready{model="mlp",replica="0"} 1.0' in text
        assert 'stagewise_replica_ready{model="mlp",replica="1"} 1.0' in text
    finally:
        backend.shutdown()


# ------------------------------------------------------------------ heartbeats, model errors (items 7, 8, 9)
_MODEL = '''
import time, torch

@torch.library.custom_op("stagewise_hostile::slow_on_seven", mutates_args=())
def slow_on_seven(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if int(ids.reshape(-1)[0]) == 7:  # a legitimately long forward
        time.sleep(2.5)
    return x.clone()

@slow_on_seven.register_fake
def _(x, ids):
    return torch.empty_like(x)

class Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(torch.ops.stagewise_hostile.slow_on_seven(self.emb(ids), ids))

def factory():
    torch.manual_seed(0)
    return Embedder(), torch.randint(0, 7, (2, 3))
'''


def test_heartbeats_find_a_stopped_worker_in_seconds_and_model_errors_are_400(tmp_path: Path) -> None:
    path = tmp_path / "embedder.py"
    path.write_text(_MODEL)
    backend = PipelineBackend(f"{path}:factory", stages=2, replicas=2, max_batch_size=4, heartbeat_timeout_s=2.0,
                              worker_timeout_s=60, restart_backoff_s=0.05, name="emb")
    try:
        backend.wait_ready(60, replicas=2)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config(max_delay_ms=20)))
        with serve_app(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
            def post(ids: list[list[int]]) -> httpx.Response:
                return http.post("/v2/models/emb/infer", json={"inputs": [
                    {"name": "arg0", "datatype": "INT64", "shape": [len(ids), 3],
                     "data": [i for row in ids for i in row]}]})

            good = post([[1, 2, 3]])
            assert good.status_code == 200, good.text
            # A forward longer than the heartbeat timeout is not a hang: the heartbeat thread keeps beating.
            slow = post([[7, 1, 1]])
            assert slow.status_code == 200, slow.text
            assert [s.generation for s in backend.status()] == [1, 1]
            # The model's own exception is a 400 naming it; the worker and its replica live on.
            bad = post([[1, 99, 2]])
            assert bad.status_code == 400 and "IndexError" in bad.json()["error"], bad.text
            assert [s.generation for s in backend.status()] == [1, 1]

            # SIGSTOP one worker: its replica fails within the heartbeat timeout and its requests move.
            victim = backend.status()[0].pids[1]
            os.kill(victim, signal.SIGSTOP)
            try:
                lat: list[float] = []

                def one(_: int) -> int:
                    t0 = time.monotonic()
                    code = post([[1, 2, 3]]).status_code
                    lat.append(time.monotonic() - t0)
                    return code

                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    codes = list(pool.map(one, range(12)))
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
            assert codes == [200] * 12 and max(lat) < 5.0, (codes, max(lat))
            status = backend.status()[0]  # failed on the heartbeat; its restart may not have begun yet
            assert "heartbeat" in (status.last_error or ""), status
            _wait_until(lambda: backend.status()[0].state == "ready", 60, "replica 0 to come back")
            assert backend.status()[0].generation >= 2, backend.status()[0]
            assert post([[1, 2, 3]]).json() == good.json()
            metrics = http.get("/metrics").text
            assert 'stagewise_replica_restarts_total{model="emb",replica="0"}' in metrics
    finally:
        backend.shutdown()


def test_a_failing_request_in_a_batch_fails_alone() -> None:
    backend = LocalBackend(torch.nn.Embedding(10, 4), name="emb", example_inputs=torch.zeros(2, 3, dtype=torch.long))

    async def main() -> list[object]:
        batcher = DynamicBatcher(backend, BatchingConfig(max_delay_ms=50, max_batch_size=16))
        await batcher.start()
        try:
            ids = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, 99, 5]]), torch.tensor([[6, 7, 8]])]
            return await asyncio.gather(*(batcher.submit({"input": x}) for x in ids), return_exceptions=True)
        finally:
            await batcher.stop()

    first, bad, last = asyncio.run(main())
    assert isinstance(bad, ModelError) and bad.status_code == 400 and "IndexError" in str(bad), bad
    want = backend.model(torch.tensor([[1, 2, 3], [6, 7, 8]]))
    assert torch.equal(first["output_0"], want[:1]), first  # type: ignore[index]
    assert torch.equal(last["output_0"], want[1:])  # type: ignore[index]


# ------------------------------------------------------------------------- HTTP clients, signals (items 2, 6)
@pytest.fixture()
def cli_server() -> Iterator[tuple[subprocess.Popen, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    # A small soft open-file limit with room above it (serve must raise it), then the CLI as `stagewise` runs it.
    limited = ("import resource, runpy; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
               "resource.setrlimit(resource.RLIMIT_NOFILE, (256, min(hard, 4096))); "
               "runpy.run_module('stagewise.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", limited, "serve", MLP, "--stages", "1", "--replicas", "2",
                             "--port", str(port), "--header-timeout", "1", "--keep-alive-timeout", "1",
                             "--max-connections", "50", "--heartbeat-timeout", "2"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "serve exited"
            try:
                return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                time.sleep(0.1)
                return False

        _wait_until(up, 90, "stagewise serve to come up")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_idle_and_slow_http_clients_cannot_exhaust_the_server(cli_server: tuple[subprocess.Popen, str]) -> None:
    proc, url = cli_server
    with open(f"/proc/{proc.pid}/limits") as f:
        soft = next(line.split()[3] for line in f if line.startswith("Max open files"))
    assert int(soft) >= 512, f"serve must raise its soft open-file limit, still {soft}"
    port = int(url.rpartition(":")[2])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(120)]
    busy = httpx.post(f"{url}/v2/models/mlp/infer", json=_mlp_body(), timeout=5)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "error" in busy.json(), busy.text
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\n")
    _trickle_until_closed(slow, b"X", 0.2, "a trickled request head must be cut off at the header timeout")
    _wait_until(lambda: all(_closed_by_peer(s) for s in idle), 5, "the server to close every idle connection")
    for s in idle + [slow]:
        s.close()
    ok = httpx.post(f"{url}/v2/models/mlp/infer", json=_mlp_body(), timeout=10)
    assert ok.status_code == 200, ok.text
    # The sequence ends with a worker killed: its replica must come back.
    with httpx.Client(base_url=url, timeout=10) as http:
        workers = sorted(p for p in set(descendants(proc.pid)) if _is_worker(p))
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)

        def restarted() -> bool:
            text = http.get("/metrics").text
            return "stagewise_replica_restarts_total" in text and all(
                line.endswith(" 1.0") for line in text.splitlines() if line.startswith("stagewise_replica_ready{"))

        _wait_until(restarted, 60, "the killed worker's replica to be restarted and ready")
        assert http.post("/v2/models/mlp/infer", json=_mlp_body()).status_code == 200


def _is_worker(pid: int) -> bool:
    """A serve worker: a forkserver child whose parent is the forkserver (the python running forkserver main)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rpartition(")")[2].split()[1])
        return b"forkserver" in Path(f"/proc/{ppid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return False


def test_sigterm_stops_serve_non_zero_and_leaves_nothing_behind(cli_server: tuple[subprocess.Popen, str]) -> None:
    proc, _ = cli_server
    family = set(descendants(proc.pid))
    assert sum(_is_worker(p) for p in family) == 2, family  # two replicas of one stage, the forkserver, the tracker
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    _wait_until(lambda: not any(running(p) for p in family), 10, f"every process of serve to exit: {family}")
