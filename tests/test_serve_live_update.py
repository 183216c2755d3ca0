"""Live weight updates end to end: training checkpoints loaded into a running pipeline service (real worker
processes, a real HTTP server) while concurrent clients keep sending requests.

Every answer names the version that computed it (``model_version``) and must equal a single-process model loaded
from that version's checkpoint; no request fails; a client never sees an older version after a newer one unless a
rollback was asked for; a corrupt checkpoint is refused and the old version goes on serving.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stagewise._spec import load_model_spec
from stagewise.serve import GatewayConfig, create_app, serve_app
from stagewise.serve._pipeline import PipelineBackend
from stagewise.serve._repository_routes import load_parameters

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(300)

MODEL = "stagewise.zoo.basic:large_model"


def _train(root: Path, *, stages: int, steps: int, lr: float, save_every: int) -> None:
    from stagewise.train import TrainConfig, Trainer

    Trainer(TrainConfig(model=MODEL, stages=stages, replicas=1, steps=steps, global_batch=8, lr=lr,
                        save_dir=str(root), save_every=save_every, keep=5, progress=False, log_every=0)).fit()


def _reference(step_dir: Path) -> torch.nn.Module:
    """The model in this process, with the weights of ``step_dir`` (read by the checkpoint package, not serve)."""
    from stagewise.checkpoint import load_checkpoint

    model = load_model_spec(MODEL).model.eval()
    model.load_state_dict(load_checkpoint(step_dir).tensors(), strict=True)
    return model


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run A (2 stages: steps 2, 4, 6), run B (3 stages, another learning rate), and a corrupt copy of A's step 6
    (one byte flipped: same size, wrong sha256)."""
    tmp = tmp_path_factory.mktemp("live")
    _train(tmp / "a", stages=2, steps=6, lr=0.05, save_every=2)
    _train(tmp / "b", stages=3, steps=3, lr=0.2, save_every=3)
    bad = tmp / "bad" / "step-00000006"
    shutil.copytree(tmp / "a" / "step-00000006", bad)
    part = sorted(bad.glob("*.model.safetensors"))[-1]
    raw = bytearray(part.read_bytes())
    raw[-3] ^= 0x40
    part.write_bytes(bytes(raw))
    return {"a": tmp / "a", "b": tmp / "b" / "step-00000003", "bad": bad}


def _post_infer(client: httpx.Client, url: str, x: np.ndarray) -> tuple[int, str, np.ndarray | str]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    resp = client.post(f"{url}/v2/models/large_model/infer", json=body)
    if resp.status_code != 200:
        return resp.status_code, "", resp.text
    doc = resp.json()
    out = doc["outputs"][0]
    return 200, doc["model_version"], np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


@pytest.fixture(scope="module")
def served(runs: dict[str, Path]) -> Iterator[tuple[PipelineBackend, str]]:
    backend = PipelineBackend(MODEL, stages=2, replicas=2, max_batch_size=8, restart_backoff_s=0.1,
                              checkpoint=str(runs["a"] / "step-00000002"), repository=str(runs["a"]))
    try:
        backend.wait_ready(120, replicas=2)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config(max_delay_ms=2)))
        with serve_app(app) as server:
            yield backend, server.url
    finally:
        backend.shutdown()


def test_load_parameters_are_checked() -> None:
    assert load_parameters(b"") == (None, None, "sha256")
    assert load_parameters(b'{"parameters": {"checkpoint": "/x", "version": 7}}') == ("/x", "7", "sha256")
    assert load_parameters(b'{"parameters": {"verify": "size"}}') == (None, None, "size")
    for bad in (b"[1]", b'{"parameters": {"config": "{}"}}', b'{"parameters": {"version": ""}}', b"{nope",
                b'{"parameters": {"verify": "md5"}}'):
        with pytest.raises(ValueError):
            load_parameters(bad)


def test_five_updates_under_load_lose_no_request_and_mix_no_versions(
        served: tuple[PipelineBackend, str], runs: dict[str, Path]) -> None:
    backend, url = served
    step = {label: runs["a"] / f"step-0000000{label}" for label in ("2", "4", "6")}
    refs = {label: _reference(path) for label, path in step.items()} | {"b3": _reference(runs["b"])}
    probe = torch.ones(1, 10)
    with torch.no_grad():
        outs = [m(probe) for m in refs.values()]
    assert all(not torch.allclose(a, b) for k, a in enumerate(outs) for b in outs[k + 1:])  # versions differ
    meta = httpx.get(f"{url}/v2/models/large_model", timeout=10).json()
    assert meta["versions"] == ["2"]

    stop = threading.Event()
    seen: list[list[tuple[str, np.ndarray, np.ndarray | str, int]]] = [[] for _ in range(3)]

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                x = rng.standard_normal((1 + i, 10)).astype(np.float32)
                status, version, out = _post_infer(http, url, x)
                seen[i].append((version, x, out, status))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()

    def load(**params: str) -> httpx.Response:
        time.sleep(0.4)  # answers of the version before
        return httpx.post(f"{url}/v2/repository/models/large_model/load", json={"parameters": params}, timeout=120)

    loads = []
    try:
        for params in ({"checkpoint": str(step["4"])},             # by step directory: version "4"
                       {"checkpoint": str(runs["b"]), "version": "b3"},  # saved by 3 stages, served by 2
                       {"checkpoint": str(runs["bad"]), "version": "bad"},  # corrupt: refused
                       {"version": "6"},                           # a step of the repository by its number
                       {"version": "4"}):                          # rollback to a version loaded before
            loads.append(load(**params))
        time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert [r.status_code for r in loads] == [200, 200, 400, 200, 200], [r.text for r in loads]
    assert [r.json().get("version") for r in loads if r.status_code == 200] == ["4", "b3", "6", "4"]
    assert "sha256" in loads[2].json()["error"] and "still serving version 'b3'" in loads[2].json()["error"]

    order = ["2", "4", "b3", "6", "4"]  # the versions served, in time order (the rollback last)
    for i, answers in enumerate(seen):
        failed = [(status, out) for _, _, out, status in answers if status != 200]
        assert not failed, f"client {i}: {failed[:3]}"
        labels = [v for v, *_ in answers]
        assert set(labels) <= set(refs), labels
        runs_of = [v for k, v in enumerate(labels) if k == 0 or labels[k - 1] != v]
        pos = 0  # a client walks the served order forwards: it may skip a version, never go back
        for v in runs_of:
            while pos < len(order) and order[pos] != v:
                pos += 1
            assert pos < len(order), f"client {i} saw versions {runs_of}, served in the order {order}"
        for version, x, out, _ in answers:
            with torch.no_grad():
                expected = refs[version](torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=4e-5, err_msg=f"version {version}")
    assert sum(len(a) for a in seen) > 30
    assert all({v for v, *_ in a} >= {"2", "b3", "4"} for a in seen)  # every client saw the updates
    assert {r.generation for r in backend.status()} == {1}  # no replica restarted: the swaps stopped nothing
    assert [r.version for r in backend.status()] == ["4", "4"]
    assert httpx.get(f"{url}/v2/models/large_model", timeout=10).json()["versions"] == ["4"]
    index = {e["version"]: e for e in httpx.post(f"{url}/v2/repository/index", timeout=10).json()}
    assert index["4"]["state"] == "READY" and index["6"]["state"] == "UNAVAILABLE"
    assert index["bad"]["state"] == "UNAVAILABLE" and "sha256" in index["bad"]["reason"]


def test_loads_that_name_no_usable_checkpoint_are_refused(served: tuple[PipelineBackend, str],
                                                          runs: dict[str, Path], tmp_path: Path) -> None:
    backend, url = served
    before = backend.current_version().label

    def load(**params: str) -> httpx.Response:
        return httpx.post(f"{url}/v2/repository/models/large_model/load", json={"parameters": params}, timeout=120)

    clash = load(checkpoint=str(runs["b"]), version="6")  # "6" is run A's step 6
    assert clash.status_code == 400 and "give this checkpoint another version" in clash.json()["error"]
    missing = load(checkpoint=str(tmp_path / "nowhere"))
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]
    unknown = load(version="77")  # not loaded before, no step-00000077 in the repository
    assert unknown.status_code == 400 and "step-00000077" in unknown.json()["error"]
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    garbage = load(checkpoint=str(tmp_path / "w.safetensors"), version="junk")
    assert garbage.status_code == 400 and f"still serving version {before!r}" in garbage.json()["error"]
    assert backend.current_version().label == before and {r.generation for r in backend.status()} == {1}


def test_a_replica_restarted_after_an_update_serves_the_new_version(
        served: tuple[PipelineBackend, str], runs: dict[str, Path]) -> None:
    import os
    import signal

    backend, url = served
    current = backend.current_version().label
    victim = backend.status()[0].pids[1]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while not (backend.status()[0].generation == 2 and backend.status()[0].state == "ready"):
        assert time.monotonic() < deadline, backend.status()
        time.sleep(0.1)
    assert [r.version for r in backend.status()] == [current, current]
    x = np.full((1, 10), -0.25, dtype=np.float32)
    path = next(v.checkpoint for v in backend._book if v.label == current and v.checkpoint)
    with torch.no_grad():
        expected = _reference(Path(path))(torch.from_numpy(x)).numpy()
    with httpx.Client(timeout=30) as http:
        for _ in range(6):  # both replicas, the restarted one included
            status, version, out = _post_infer(http, url, x)
            assert status == 200 and version == current
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=4e-5)


def test_unload_then_load_serves_again(served: tuple[PipelineBackend, str], runs: dict[str, Path]) -> None:
    backend, url = served
    x = np.ones((2, 10), dtype=np.float32)
    resp = httpx.post(f"{url}/v2/repository/models/large_model/unload", timeout=60)
    assert resp.status_code == 200, resp.text
    with httpx.Client(timeout=30) as http:
        status, _, text = _post_infer(http, url, x)
        assert status == 503 and "not ready" in str(text)
        assert http.get(f"{url}/v2/health/ready").status_code == 503
        resp = http.post(f"{url}/v2/repository/models/large_model/load", json={"parameters": {"version": "6"}},
                         timeout=120)
        assert resp.status_code == 200 and resp.json()["version"] == "6", resp.text
        backend.wait_ready(60, replicas=2)
        status, version, out = _post_infer(http, url, x)
    assert status == 200 and version == "6"
    with torch.no_grad():
        expected = _reference(runs["a"] / "step-00000006")(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=4e-5)


def test_a_local_backend_refuses_loads_with_a_reason() -> None:
    from stagewise.serve import LocalBackend

    app = create_app(LocalBackend(torch.nn.Linear(3, 2), name="lin", example_inputs=torch.zeros(1, 3)))
    with serve_app(app) as server:
        resp = httpx.post(f"{server.url}/v2/repository/models/lin/load", json={}, timeout=10)
        assert resp.status_code == 400 and "cannot load weights" in resp.json()["error"]
        assert httpx.post(f"{server.url}/v2/repository/models/nope/load", timeout=10).status_code == 404
        index = httpx.post(f"{server.url}/v2/repository/index", timeout=10).json()
        assert index == [{"name": "lin", "version": "1", "state": "READY", "reason": ""}]
        assert "model_repository" in httpx.get(f"{server.url}/v2", timeout=10).json()["extensions"]


def test_a_training_run_pushes_its_weights_to_the_running_service(
        served: tuple[PipelineBackend, str], tmp_path: Path) -> None:
    """``--serve-url`` with ``--push-every 3`` over 5 steps: steps 3 and 5 are pushed (through the push folder, in
    shared memory by default), each served as soon as it is loaded; the answers are the trained model's."""
    from stagewise.train import TrainConfig, Trainer

    backend, url = served
    push_dir = tmp_path / "push"
    result = Trainer(TrainConfig(model=MODEL, stages=3, replicas=1, steps=5, global_batch=8, lr=0.1,
                                 serve_url=url, push_every=3, push_dir=str(push_dir), progress=False,
                                 log_every=0)).fit()
    assert result.last_step == 5
    index = {e["version"]: e for e in httpx.post(f"{url}/v2/repository/index", timeout=10).json()}
    assert index["3"]["state"] == "UNAVAILABLE" and index["5"]["state"] == "READY", index  # 3 was served, then 5
    assert [r.version for r in backend.status()] == ["5", "5"]
    x = np.full((2, 10), 0.5, dtype=np.float32)
    with httpx.Client(timeout=30) as http:
        status, version, out = _post_infer(http, url, x)
    assert status == 200 and version == "5"
    model = load_model_spec(MODEL).model.eval()
    model.load_state_dict(result.state_dict(), strict=True)  # the run's final weights, as the trainer returns them
    with torch.no_grad():
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=4e-5)


def test_push_settings_are_checked() -> None:
    from stagewise._errors import ConfigError
    from stagewise.train import TrainConfig
    from stagewise.train._push import default_push_dir, load_url

    assert load_url("http://h:1", "m") == "http://h:1/v2/repository/models/m/load"
    assert load_url("http://h:1/v2/models/other/", "m") == "http://h:1/v2/repository/models/other/load"
    with pytest.raises(ValueError, match="serve-url"):
        load_url("h:1", "m")
    with pytest.raises(ConfigError, match="--serve-url"):
        TrainConfig(model=MODEL, push_every=2)
    assert default_push_dir("x").name == "stagewise-push-x"


def test_serve_watch_follows_a_training_run_and_never_loads_a_half_written_step(tmp_path: Path) -> None:
    """``stagewise serve CKPT_DIR --watch``: it starts on the newest step; a step being written (``.tmp``, or a
    directory without its manifest yet) is never loaded; the step a resumed run commits is served next."""
    import os
    import socket
    import subprocess
    import sys

    root = tmp_path / "run"
    _train(root, stages=2, steps=4, lr=0.05, save_every=2)
    (root / "step-00000099.tmp").mkdir()
    (root / "step-00000099.tmp" / "rank0.model.safetensors").write_bytes(b"half")
    (root / "step-00000098").mkdir()  # no manifest: not committed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stagewise.cli", "serve", str(root), "--watch", "--watch-interval",
                             "0.2", "--port", str(port), "--stages", "2", "--max-batch-size", "4"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    x = np.ones((1, 10), dtype=np.float32)

    def version() -> str | None:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "serve exited"
        try:
            with httpx.Client(timeout=10) as http:
                status, v, _ = _post_infer(http, url, x)
        except httpx.TransportError:
            time.sleep(0.2)
            return None
        return v if status == 200 else None

    try:
        deadline = time.monotonic() + 120
        while version() != "4":
            assert time.monotonic() < deadline, "serve did not come up on step 4"
        time.sleep(1.0)  # a few polls over the half-written steps
        assert version() == "4"
        from stagewise.train import TrainConfig, Trainer

        Trainer(TrainConfig(model=MODEL, stages=2, replicas=1, steps=6, global_batch=8, lr=0.05, save_dir=str(root),
                            save_every=2, keep=5, resume=str(root), progress=False, log_every=0)).fit()
        deadline = time.monotonic() + 60
        while (v := version()) != "6":
            assert v in ("4", None) and time.monotonic() < deadline, v
        with httpx.Client(timeout=10) as http:
            _, _, out = _post_infer(http, url, x)
            meta = http.get(f"{url}/v2/models/large_model").json()
        assert meta["versions"] == ["6"]
        with torch.no_grad():
            expected = _reference(root / "step-00000006")(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=4e-5)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
