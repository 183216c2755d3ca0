"""Chaos check of serving: clients that verify every answer while workers are killed and stopped under them.

Run: ``PYTHONPATH=src python bench/chaos.py`` (about 90 s; loopback only; stops by itself).

A real ``stagewise serve`` process (through the CLI, 2 stages x 2 replicas of ``stagewise.zoo.basic:mlp``,
``--heartbeat-timeout 2``) and 8 client threads, each on its own keep-alive HTTP/1.1 connection, each sending one-row
requests and comparing every answer with the model run in this process. During ``--seconds`` (60): 3 SIGKILLs of a
worker and one SIGSTOP of a worker held for 20 s (then SIGCONT, if the gateway has not killed it by then). Before each
fault the bench waits until both replicas are ready (``stagewise_replica_ready`` in ``/metrics``), so each fault hits a
healthy service; after it, it measures how long until both are ready again (a restart counted).

The last line is machine-readable:
``chaos requests=N wrong=W failed=F p99_ms=P max_ms=M recover_s=R`` (R: the slowest recovery). Goals: W = F = 0,
M <= 5000 (a stopped worker's requests move within the heartbeat timeout), R <= 5.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from stagewise._procs import live_children
from stagewise._spec import load_model_spec

MODEL = "stagewise.zoo.basic:mlp"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _workers(server: int) -> list[int]:
    """Stage workers: the children of serve's forkserver child."""
    for child in live_children().get(server, []):
        try:
            if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                return live_children().get(child, [])
        except FileNotFoundError:
            continue
    return []


class _Metrics:
    def __init__(self, port: int) -> None:
        self.port = port

    def read(self) -> tuple[list[float], float]:
        """(replica_ready gauges, total restarts)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        ready = [float(line.rpartition(" ")[2]) for line in text.splitlines()
                 if line.startswith("stagewise_replica_ready{")]
        restarts = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                       if line.startswith("stagewise_replica_restarts_total{"))
        return ready, restarts

    def wait_all_ready(self, timeout_s: float, *, restarts_above: float = -1) -> float | None:
        """Seconds until every replica is ready (and restarts exceed ``restarts_above``); None on timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            try:
                ready, restarts = self.read()
                if len(ready) == 2 and all(r == 1.0 for r in ready) and restarts > restarts_above:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.05)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--stop-seconds", type=float, default=20.0)
    args = parser.parse_args()

    spec = load_model_spec(MODEL)
    model = spec.model.eval()
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(16):
        x = rng.standard_normal((1, 64)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        body = json.dumps({"inputs": [{"name": "arg0", "datatype": "FP32", "shape": [1, 64],
                                       "data": x.reshape(-1).tolist()}]})
        cases.append((body, want))

    port = _free_port()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server; serve's log: read back only if it fails to come up
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "stagewise.cli", "serve", MODEL, "--stages", "2", "--replicas",
                               "2", "--port", str(port), "--heartbeat-timeout", "2", "--max-batch-size", "8",
                               "--threads", "1"], env=env, stderr=log, text=True)
    metrics = _Metrics(port)
    stats = {"requests": 0, "wrong": 0, "failed": 0}
    lat: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        r = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            body, want = cases[r.randrange(len(cases))]
            t0 = time.monotonic()
            ok = wrong = False
            try:
                conn.request("POST", "/v2/models/mlp/infer", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                doc = json.loads(resp.read())
                if resp.status == 200:
                    got = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(want.shape)
                    ok, wrong = True, not np.allclose(got, want, atol=1e-5, rtol=0)
                else:
                    print(f"chaos: HTTP {resp.status}: {doc}", file=sys.stderr)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                print(f"chaos: request failed: {exc!r}", file=sys.stderr)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                stats["requests"] += 1
                stats["wrong"] += wrong
                stats["failed"] += not ok
                lat.append(time.monotonic() - t0)
        conn.close()

    recover: list[float] = []
    try:
        if metrics.wait_all_ready(120) is None:
            log.seek(0)
            raise SystemExit(f"chaos: serve did not come up:\n{log.read()[-3000:]}")
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        start = time.monotonic()
        span = args.seconds
        plan = [(0.10, "kill"), (0.25, "stop"), (0.70, "kill"), (0.85, "kill")]
        pick = random.Random(1)
        for at, what in plan:
            time.sleep(max(0.0, start + at * span - time.monotonic()))
            if metrics.wait_all_ready(30) is None:
                print("chaos: replicas not all ready before a fault", file=sys.stderr)
            _, restarts = metrics.read()
            victim = pick.choice(_workers(server.pid))
            t0 = time.monotonic()
            if what == "kill":
                os.kill(victim, signal.SIGKILL)
            else:
                os.kill(victim, signal.SIGSTOP)
            took = metrics.wait_all_ready(30, restarts_above=restarts)
            recover.append(took if took is not None else float("inf"))
            print(f"chaos: {what} of worker {victim} at {t0 - start:.1f} s: both replicas ready again after "
                  f"{recover[-1]:.2f} s", file=sys.stderr)
            if what == "stop":
                time.sleep(max(0.0, t0 + args.stop_seconds - time.monotonic()))
                try:
                    os.kill(victim, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        time.sleep(max(0.0, start + span - time.monotonic()))
    finally:
        stop.set()
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
    with lock:
        ms = sorted(x * 1000 for x in lat)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))] if ms else float("nan")
    print(f"chaos requests={stats['requests']} wrong={stats['wrong']} failed={stats['failed']} p99_ms={p99:.0f} "
          f"max_ms={ms[-1] if ms else float('nan'):.0f} recover_s={max(recover, default=float('nan')):.2f}")


if __name__ == "__main__":
    main()
