"""The pipeline backend end to end: real stage-worker processes, a real HTTP server on a free port, httpx clients.

Compared against the model run in this process (eval mode). Also: the channel's framing, batch padding, worker death
mid-stream (every request still answered correctly, the replica restarts and serves again) and clean shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_load import Load, kill_under_load, wait_until

from stagewise._procs import running
from stagewise._spec import load_model_spec
from stagewise.serve import GatewayConfig, RunningServer, create_app, serve_app
from stagewise.serve._channel import Channel, ChannelError, encode_frame
from stagewise.serve._cli import add_infer_parser
from stagewise.serve._pipeline import PipelineBackend, PipelineConfig
from stagewise.serve._serving_split import bucket_rows, pad_rows

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(90)

MODEL = "stagewise.zoo.basic:large_model"



def _infer_json(client: httpx.Client, url: str, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "arg0", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]}
    resp = client.post(f"{url}/v2/models/large_model/infer", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["name"] == "output" and out["datatype"] == "FP32"
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


# ----------------------------------------------------------------------------------------------- no processes
def test_channel_round_trips_every_dtype_over_a_socket() -> None:
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    tensors = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(2, 3).to(torch.bfloat16), "bool": torch.rand(4) > 0.5,
        "i64": torch.arange(7).reshape(7, 1), "empty": torch.empty(0, 4),
        "u8": torch.tensor([1, 2, 255], dtype=torch.uint8),
        "noncontig": torch.randn(4, 6).t(), "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    left.send({"kind": "run", "seq": 3}, tensors)
    msg = right.recv()
    assert msg is not None and msg.kind == "run" and msg.header["seq"] == 3
    assert list(msg.tensors) == list(tensors)
    for name, t in tensors.items():
        got = msg.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    left.close()
    assert right.recv() is None  # clean EOF between frames
    right.close()


def test_channel_rejects_garbage_and_truncated_frames() -> None:
    a, b = socket.socketpair()
    chan = Channel(b)
    a.sendall(b"GET / HTTP/1.1\r\n\r\n")  # a stray client: sizes far beyond the limits
    with pytest.raises(ChannelError, match="exceed"):
        chan.recv()
    a.close()
    chan.close()
    a, b = socket.socketpair()
    chan = Channel(b)
    frame = encode_frame({"kind": "result"}, {"x": torch.ones(100)})
    a.sendall(frame[:-10])
    a.close()
    with pytest.raises(ChannelError, match="inside a frame"):
        chan.recv()
    chan.close()


def test_batches_pad_to_powers_of_two_within_the_limit() -> None:
    assert [bucket_rows(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert bucket_rows(17, 24) == 24 and bucket_rows(3, 3) == 3
    x = torch.arange(6.0).reshape(3, 2)
    padded = pad_rows(x, 4)
    assert padded.shape == (4, 2) and torch.equal(padded[:3], x) and torch.equal(padded[3], x[2])


def test_pipeline_names_are_exported() -> None:
    import stagewise.serve as serve

    assert {"PipelineBackend", "PipelineConfig", "ReplicaStatus"} <= set(serve.__all__)
    assert serve.PipelineBackend is PipelineBackend and serve.PipelineConfig is PipelineConfig


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="PipelineConfig.stages"):
        PipelineConfig(model=MODEL, stages=0)
    with pytest.raises(ValueError, match="PipelineConfig.name"):
        PipelineConfig(model=MODEL, name="a/b")


# ----------------------------------------------------------------------------------------------- real processes
def _shm_segments(since: float) -> list[str]:
    return [e.name for e in os.scandir("/dev/shm")
            if e.name.startswith("stagewise-shm-") and e.stat().st_mtime >= since]


@pytest.fixture(scope="module", params=["auto", "shm"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[PipelineBackend, RunningServer]]:
    started = time.time() - 1
    backend = PipelineBackend(MODEL, stages=2, replicas=2, max_batch_size=8, restart_backoff_s=0.1,
                              transport=request.param)
    try:
        backend.wait_ready(60, replicas=2)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config(max_delay_ms=2)))
        with serve_app(app) as server:
            yield backend, server
    finally:
        backend.shutdown()
    assert not _shm_segments(started), "shared-memory segments outlived the service"


def test_stages_talk_through_the_transport_asked_for(served: tuple[PipelineBackend, RunningServer]) -> None:
    """With shm every worker maps the rings it shares with the other stage (unlinked at once: '(deleted)')."""
    backend, _ = served
    for replica in backend.status():
        for pid in replica.pids:
            maps = Path(f"/proc/{pid}/maps").read_text()
            rings = set(re.findall(r"/dev/shm/(stagewise-shm-\S+)", maps))
            if backend.config.transport == "shm":
                assert len(rings) >= 2, maps  # the ring it reads and the ring it writes (and its doorbell)
            else:
                assert not rings, rings


def test_metadata_names_inputs_and_outputs_by_leaf(served: tuple[PipelineBackend, RunningServer]) -> None:
    backend, server = served
    doc = httpx.get(f"{server.url}/v2/models/large_model", timeout=10).json()
    assert doc["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 10]}]  # forward(self, x)
    assert doc["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 40]}]
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert [r.state for r in backend.status()] == ["ready", "ready"]


def test_concurrent_clients_get_the_models_answers(served: tuple[PipelineBackend, RunningServer]) -> None:
    backend, server = served
    model = load_model_spec(MODEL).model.eval()
    errors: list[str] = []

    def client(i: int) -> None:
        rng = np.random.default_rng(i)
        with httpx.Client(timeout=30) as c:
            for k in range(6):
                x = rng.standard_normal((1 + (i + k) % 3, 10)).astype(np.float32)  # each thread its own x
                got = _infer_json(c, server.url, x)
                with torch.no_grad():
                    want = model(torch.from_numpy(x)).numpy()
                if got.shape != want.shape or not np.allclose(got, want, atol=1e-5, rtol=0):
                    errors.append(f"client {i} request {k}: max error {np.abs(got - want).max()}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    for stage in ("0", "1"):
        assert f'stagewise_stage_seconds_count{{model="large_model",stage="{stage}"}}' in metrics
    assert sum(r.completed for r in backend.status()) >= 1


def test_infer_cli_prints_the_outputs(served: tuple[PipelineBackend, RunningServer],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _, server = served
    parser = argparse.ArgumentParser()
    add_infer_parser(parser.add_subparsers())
    args = parser.parse_args(["infer", server.url, "large_model", "--random", "--rows", "3"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("output FP32 [3, 40]")
    args = parser.parse_args(["infer", server.url, "large_model", "--input", "x=[[1,2,3,4,5,6,7,8,9,10]]",
                              "--json"])
    assert args.func(args) == 0
    assert '"shape": [1, 40]' in capsys.readouterr().out


def test_killing_a_worker_mid_stream_loses_no_request(served: tuple[PipelineBackend, RunningServer]) -> None:
    backend, server = served
    victim = backend.status()[0]
    with Load(server.url, clients=4) as load:
        wait_until(lambda: len(load.answers) >= 20, 30, "20 answers before the kill")
        # the last stage of replica 0, with batches in flight
        cause = kill_under_load(backend, load, lambda: os.kill(victim.pids[1], signal.SIGKILL), back_s=30)
    load.check()
    assert not running(victim.pids[0]) and not running(victim.pids[1]), "the dead replica's other worker survived"
    assert "stage 1" in cause, cause


def test_gpt2_pipeline_matches_and_close_reaps_every_worker() -> None:
    pytest.importorskip("transformers")
    backend = PipelineBackend("stagewise.zoo.hf:gpt2", stages=2, replicas=1, max_batch_size=4)
    try:
        backend.wait_ready(60)
        meta = backend.metadata()
        assert [t.name for t in meta.inputs] == ["input_ids", "attention_mask"]
        assert meta.outputs[0].name == "logits" and meta.outputs[0].shape == (-1, 12, 128)
        pids = [p for r in backend.status() for p in r.pids]
        assert len(pids) == 2 and all(running(p) for p in pids)
        spec = load_model_spec("stagewise.zoo.hf:gpt2")
        ids = spec.kwargs["input_ids"][:3]
        def body(input_ids: torch.Tensor) -> dict[str, object]:
            pairs = (("input_ids", input_ids), ("attention_mask", torch.ones_like(input_ids)))
            return {"inputs": [{"name": n, "datatype": "INT64", "shape": list(t.shape), "data": t.reshape(-1).tolist()}
                               for n, t in pairs], "outputs": [{"name": "logits"}]}

        with serve_app(create_app(backend, config=GatewayConfig(close_backends=False))) as server:
            url = f"{server.url}/v2/models/gpt2/infer"
            bad = httpx.post(url, json=body(torch.full_like(ids, 10**6)), timeout=60)  # token ids past the vocab
            resp = httpx.post(url, json=body(ids), timeout=60)  # the pipeline stayed in step after the failure
        assert bad.status_code == 400 and "IndexError" in bad.json()["error"], bad.text  # the model's own, as Triton
        assert backend.status()[0].generation == 1, "a bad batch must not cost a replica"
        assert resp.status_code == 200, resp.text
        out = resp.json()["outputs"][0]
        got = torch.tensor(out["data"]).reshape(out["shape"])
        with torch.no_grad():
            want = spec.model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)
    finally:
        backend.shutdown()
    assert not backend.ready()
    wait_until(lambda: not any(running(p) for p in pids), 5, "every worker to be reaped")


def test_a_factory_building_different_weights_per_process_is_refused(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "unseeded.py"  # type: ignore[operator]
    path.write_text("import os, torch\n"
                    "def factory():\n"
                    "    torch.manual_seed(os.getpid())  # every process its own weights\n"
                    "    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), torch.randn(2, 4)\n")
    backend = PipelineBackend(f"{path}:factory", stages=2, replicas=1, max_batch_size=2, restart_backoff_s=0.05)
    try:
        with pytest.raises(RuntimeError, match="not deterministic"):
            backend.wait_ready(60)
        assert not backend.ready()
    finally:
        backend.shutdown()


def test_serves_a_training_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import httpx
    from safetensors.torch import load_file

    from stagewise.checkpoint import export_state_dict, load_checkpoint
    from stagewise.serve._serving_split import checkpoint_model
    from stagewise.train import TrainConfig, Trainer

    root = tmp_path / "ckpt"
    Trainer(TrainConfig(model="stagewise.zoo.basic:large_model", stages=2, replicas=2, steps=2, global_batch=16,
                        lr=0.05, save_dir=str(root), progress=False, log_every=0)).fit()
    assert checkpoint_model(str(root)) == "stagewise.zoo.basic:large_model"
    spec = load_model_spec("stagewise.zoo.basic:large_model")
    x = torch.randn(3, 10)
    fresh = spec.model.eval()(x).detach()
    export_state_dict(load_checkpoint(root), tmp_path / "w.safetensors", model=spec.model)
    spec.model.load_state_dict(load_file(str(tmp_path / "w.safetensors")), strict=True)
    expected = spec.model(x).detach()
    backend = PipelineBackend("stagewise.zoo.basic:large_model", stages=2, replicas=1, max_batch_size=4,
                              checkpoint=str(root))
    try:
        backend.wait_ready(120)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config()))
        with serve_app(app, port=0) as server:
            body = {"inputs": [{"name": "arg0", "shape": [3, 10], "datatype": "FP32", "data": x.flatten().tolist()}]}
            out = httpx.post(f"{server.url}/v2/models/large_model/infer", json=body, timeout=60).json()["outputs"][0]
        got = torch.tensor(out["data"]).view(out["shape"])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, fresh)  # the trained weights were served, not the factory's
    finally:
        backend.shutdown()


def test_each_task_head_is_served_as_its_own_model() -> None:
    import httpx

    spec = load_model_spec("stagewise.zoo.basic:multitask")
    model = spec.model.eval()
    x = spec.args[0][:2]
    with torch.no_grad():
        expected = model(x)
    backends = [PipelineBackend("stagewise.zoo.basic:multitask", stages=2, max_batch_size=4,
                                tasks=("heads.cls", "heads.reg"), head=h) for h in ("heads.cls", "heads.reg")]
    try:
        for b in backends:
            b.wait_ready(120)
        assert [b.name for b in backends] == ["multitask.heads.cls", "multitask.heads.reg"]
        app = create_app(backends, config=GatewayConfig(model_batching={b.name: b.batching_config() for b in backends}))
        with serve_app(app, port=0) as server:
            for b, key in zip(backends, ("cls", "reg")):
                meta = httpx.get(f"{server.url}/v2/models/{b.name}", timeout=30).json()
                assert [o["name"] for o in meta["outputs"]] == [key]  # only this head's output
                body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.flatten().tolist()}]}
                out = httpx.post(f"{server.url}/v2/models/{b.name}/infer", json=body, timeout=60).json()["outputs"][0]
                torch.testing.assert_close(torch.tensor(out["data"]).view(out["shape"]), expected[key],
                                           rtol=1e-5, atol=1e-5)
    finally:
        for b in backends:
            b.shutdown()


def test_a_sub_model_is_served_as_its_own_model() -> None:
    import httpx

    spec = load_model_spec("stagewise.zoo.basic:resnet")
    model = spec.model.eval()
    x = spec.args[0][:2]
    with torch.no_grad():
        expected = model.blocks(model.stem(x))
    backend = PipelineBackend("stagewise.zoo.basic:resnet", stages=2, max_batch_size=4, submodule="blocks")
    try:
        backend.wait_ready(120)
        assert backend.name == "resnet.blocks"
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config()))
        with serve_app(app, port=0) as server:
            meta = httpx.get(f"{server.url}/v2/models/resnet.blocks", timeout=30).json()
            h = model.stem(x).detach()  # what the sub-model receives inside the whole model
            assert meta["inputs"][0]["shape"] == [-1, *h.shape[1:]]
            body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": list(h.shape), "datatype": "FP32",
                                "data": h.flatten().tolist()}]}
            out = httpx.post(f"{server.url}/v2/models/resnet.blocks/infer", json=body, timeout=60).json()["outputs"][0]
        torch.testing.assert_close(torch.tensor(out["data"]).view(out["shape"]), expected, rtol=1e-5, atol=1e-5)
    finally:
        backend.shutdown()


def test_model_inputs_read_by_later_stages_travel_with_the_activations() -> None:
    from stagewise.serve._serving_split import load_serving_split

    model = "stagewise.zoo.basic:kwargs_model"
    serving = load_serving_split(model, stages=3)
    later = {n for st in serving.sm.stages[1:] for n in st.spec.inputs}
    assert later, "the test needs a model input read after stage 0"
    backend = PipelineBackend(model, stages=3, replicas=1, max_batch_size=4)
    try:
        backend.wait_ready(60)
        names = [t.name for t in backend.metadata().inputs]
        assert later <= set(names)
        spec = load_model_spec(model)
        rng = torch.Generator().manual_seed(3)
        x = torch.randn(3, 10, generator=rng)
        mask = torch.rand(3, 32, generator=rng) > 0.3
        extra = torch.randn(3, 8, generator=rng)
        values = dict(zip(names, (x, mask, extra)))
        body = {"inputs": [{"name": n, "datatype": "BOOL" if t.dtype == torch.bool else "FP32",
                            "shape": list(t.shape), "data": t.reshape(-1).tolist()} for n, t in values.items()]}
        with serve_app(create_app(backend, config=GatewayConfig(close_backends=False))) as server:
            resp = httpx.post(f"{server.url}/v2/models/kwargs_model/infer", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        out = resp.json()["outputs"][0]
        got = torch.tensor(out["data"]).reshape(out["shape"])
        with torch.no_grad():
            want = spec.model.eval()(x, mask=mask, scale=spec.kwargs["scale"], extra=extra)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    finally:
        backend.shutdown()


_STALLING = '''
import time, torch

@torch.library.custom_op("stagewise_test::stall_on_huge", mutates_args=())
def stall_on_huge(x: torch.Tensor) -> torch.Tensor:
    if float(x.reshape(-1)[0]) > 1e6:  # a poisoned request: this stage hangs
        time.sleep(30)
    return x.clone()

@stall_on_huge.register_fake
def _(x):
    return torch.empty_like(x)

class Stalling(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.ops.stagewise_test.stall_on_huge(self.a(x) + 0 * x[:, :1] + x[:, :1]))

def factory():
    torch.manual_seed(0)
    return Stalling(), torch.randn(2, 4)
'''


def test_a_stuck_stage_fails_its_replica_and_the_pipeline_recovers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "stalling.py"
    path.write_text(_STALLING)
    backend = PipelineBackend(f"{path}:factory", stages=2, replicas=1, max_batch_size=2, worker_timeout_s=1.0,
                              max_attempts=2, restart_backoff_s=0.05)
    try:
        backend.wait_ready(60)

        def infer(x: torch.Tensor) -> dict[str, torch.Tensor]:
            return asyncio.run(backend.infer({"arg0": x}))

        x = torch.randn(2, 4)
        good = infer(x)["output"]
        t0 = time.monotonic()
        with pytest.raises(Exception, match="not answered within 1 s"):
            infer(torch.full((1, 4), 1e7))
        assert time.monotonic() - t0 < 20, "a stuck batch must fail in about worker_timeout_s per attempt"
        backend.wait_ready(60)
        assert backend.status()[0].generation >= 3, "each stuck attempt must restart the replica"
        assert torch.equal(infer(x)["output"], good)
    finally:
        backend.shutdown()
