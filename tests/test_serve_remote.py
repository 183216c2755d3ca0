"""Stage workers that join from another host (``stagewise worker --join``): the gateway leaves replica 0's stage 1
open, a ``stagewise worker`` process takes it after proving the token, answers are the model's, a SIGKILL of the
joined worker loses no request and it joins again, a worker with a wrong token is refused and logged.

Here the "other host" is another process on the loopback (the protocol is the same; tests/test_multi_host.py has the
network namespaces for training)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from serve_load import MODEL, Load, kill_under_load, wait_until

from stagewise._procs import grandchildren
from stagewise.comm import find_free_port
from stagewise.serve import GatewayConfig, PipelineBackend, create_app, serve_app
from stagewise.serve._join import assignment_from_wire, assignment_to_wire

pytestmark = pytest.mark.timeout(300)

SRC = Path(__file__).resolve().parent.parent / "src"


def _worker(port: int, token: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "STAGEWISE_TOKEN": token}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "stagewise.cli", "worker", "--join", f"127.0.0.1:{port}",
                                 "--join-timeout", "5"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)



def test_the_assignment_travels_as_data_and_rebuilds_the_same_stage() -> None:
    from stagewise.serve._serving_split import load_serving_split, stage_assignments

    serving = load_serving_split(MODEL, stages=2, exclude_inputs=("labels",), seed=0)
    sent = stage_assignments(serving, 4)[1]
    header, tensors = assignment_to_wire(sent)
    got = assignment_from_wire(header, tensors, ["stagewise.zoo.basic"])
    assert sorted(got.packs) == sorted(sent.packs) and got.next_recv == sent.next_recv
    assert got.forwarded == sent.forwarded and got.param_names() == sent.param_names()
    assert [n.op for n in got.packs[4].stages[1].module.graph.nodes] == \
        [n.op for n in sent.packs[4].stages[1].module.graph.nodes]


def test_a_joined_worker_serves_survives_a_kill_and_a_wrong_token_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = find_free_port()
    backend = PipelineBackend(MODEL, stages=2, replicas=2, max_batch_size=8, restart_backoff_s=0.1,
                              remote=("0:1",), worker_listen=f"127.0.0.1:{port}", join_token="s3cret")
    good = bad = None
    try:
        with caplog.at_level(logging.INFO, logger="stagewise.serve"):
            bad = _worker(port, "wrong", tmp_path / "bad.log")
            good = _worker(port, "s3cret", tmp_path / "good.log")
            backend.wait_ready(120, replicas=2)
            assert backend.status()[0].pids == (backend.status()[0].pids[0],)  # stage 1 has no process here
            app = create_app(backend, config=GatewayConfig(batching=backend.batching_config(max_delay_ms=2)))
            with serve_app(app) as server, Load(server.url) as load:
                wait_until(lambda: len(load.answers) >= 20 and backend.status()[0].completed >= 3, 60,
                           "answers through the joined worker")
                joined = grandchildren(good.pid)  # `stagewise worker` -> its forkserver -> the worker
                assert len(joined) == 1, joined
                kill_under_load(backend, load, lambda: os.kill(joined[0], signal.SIGKILL), back_s=120)
        refused = [r.getMessage() for r in caplog.records if "refused a channel connection" in r.getMessage()]
        assert refused and "failed authentication" in refused[0] and "127.0.0.1:" in refused[0], refused
        joins = [r.getMessage() for r in caplog.records if "joined as replica 0 stage 1" in r.getMessage()]
        assert len(joins) >= 2, joins  # the first join and the one after the kill
    finally:
        backend.shutdown()
        if bad is not None and bad.poll() is None:
            os.killpg(bad.pid, signal.SIGKILL)
    load.check()
    assert good is not None and good.wait(30) == 0, (tmp_path / "good.log").read_text()[-3000:]  # gateway gone
    assert bad is not None and bad.wait(10) is not None
    assert "joined" not in (tmp_path / "bad.log").read_text()


_CLIENT = '''
import json, os, sys, time
import httpx, numpy as np, torch
from stagewise._spec import load_model_spec

url, out, stop = sys.argv[1:4]
model = load_model_spec("stagewise.zoo.basic:large_model").model.eval()
auth = {"Authorization": "Bearer s3cret"}
counts = {"ok": 0, "failed": 0, "wrong": 0, "errors": []}
deadline = time.monotonic() + 240
with httpx.Client(timeout=60, headers=auth) as c:
    while time.monotonic() < deadline:
        try:
            if c.get(url + "/v2/health/ready").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    rng = np.random.default_rng(0)
    while not os.path.exists(stop) and time.monotonic() < deadline:
        x = rng.standard_normal((2, 10)).astype(np.float32)
        body = {"inputs": [{"name": "arg0", "datatype": "FP32", "shape": [2, 10], "data": x.reshape(-1).tolist()}]}
        try:
            r = c.post(url + "/v2/models/large_model/infer", json=body)
        except httpx.HTTPError as exc:
            r = None
            counts["errors"].append(repr(exc))
        if r is None or r.status_code != 200:
            counts["failed"] += 1
            counts["errors"].append(r.text if r is not None else "")
        else:
            got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
            with torch.no_grad():
                good = np.allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5)
            counts["ok" if good else "wrong"] += 1
        with open(out + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(out + ".tmp", out)
'''


def _counts(path: Path) -> dict[str, int]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"ok": 0, "failed": 0, "wrong": 0}


def test_across_network_namespaces_stage_1_on_host_b_serves_and_fails_over() -> None:
    """Host A: the gateway and stage 0 (and replica 1); host B: the joined stage 1 of replica 0, a worker with a
    wrong token, and the client. Everything on the wire between A and B is framed data, the join authenticated."""
    import tempfile

    from _netns import hosts, netns_skip_reason

    skip = netns_skip_reason()
    if skip is not None:
        pytest.skip(f"no test hosts: {skip}")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp, hosts(2) as (a, b):
        root = Path(tmp)
        (root / "client.py").write_text(_CLIENT)
        logs = {name: (root / f"{name}.log").open("w") for name in ("serve", "good", "bad", "client")}
        serve = a.popen([sys.executable, "-m", "stagewise.cli", "serve", MODEL, "--stages", "2", "--replicas", "2",
                         "--max-batch-size", "8", "--remote", "0:1", "--worker-listen", f"{a.addr}:7070", "--host",
                         a.addr, "--port", "8000", "--token", "s3cret", "--restart-backoff", "0.1"],
                        env=env, stdout=logs["serve"], stderr=subprocess.STDOUT)
        good = b.popen([sys.executable, "-m", "stagewise.cli", "worker", "--join", f"{a.addr}:7070",
                        "--join-timeout", "5"], env=env | {"STAGEWISE_TOKEN": "s3cret"},
                       stdout=logs["good"], stderr=subprocess.STDOUT)
        b.popen([sys.executable, "-m", "stagewise.cli", "worker", "--join", f"{a.addr}:7070", "--join-timeout", "5"],
                env=env | {"STAGEWISE_TOKEN": "wrong"}, stdout=logs["bad"], stderr=subprocess.STDOUT)
        out, stop = root / "counts.json", root / "stop"
        client = b.popen([sys.executable, str(root / "client.py"), f"http://{a.addr}:8000", str(out), str(stop)],
                         env=env, stdout=logs["client"], stderr=subprocess.STDOUT)

        def text(name: str) -> str:
            return (root / f"{name}.log").read_text()

        try:
            wait_until(lambda: (_counts(out)["ok"] >= 20 and "joined" in text("good")) or client.poll() is not None
                  or serve.poll() is not None, 240, "answers with stage 1 on host B")
            assert _counts(out)["ok"] >= 20, text("serve")[-3000:] + text("good")[-2000:] + text("client")[-2000:]
            joined = re.findall(r"joined \S+ as replica 0 stage 1 \(pid (\d+)\)", text("good"))
            assert len(joined) == 1, text("good")[-2000:]
            os.kill(int(joined[0]), signal.SIGKILL)
            before = _counts(out)["ok"]
            wait_until(lambda: text("good").count("joined") >= 2, 120, "the worker on host B to join again")
            wait_until(lambda: _counts(out)["ok"] >= before + 40, 120, "answers after the kill")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- serve\n{text('serve')[-3000:]}\n--- worker\n{text('good')[-2000:]}\n"
                                 f"--- client\n{text('client')[-2000:]}\n{_counts(out)}") from None
        finally:
            stop.touch()
            client.wait(60)
            serve.send_signal(signal.SIGINT)
            serve.wait(60)
        counts = _counts(out)
        assert counts["failed"] == 0 and counts["wrong"] == 0, counts
        assert "joined 10.231.0.1:7070 as replica 0 stage 1" in text("good"), text("good")[-2000:]
        assert f"refused a channel connection from {b.addr}:" in text("serve"), text("serve")[-3000:]
        assert "failed authentication" in text("serve")
        assert "joined" not in text("bad")
        assert good.wait(30) == 0, text("good")[-2000:]  # the gateway went away: the worker stops by itself
