"""The v2 gateway over real HTTP: uvicorn on a free 127.0.0.1 port, httpx and tritonclient as clients."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

from stagewise.serve import (
    BatchingConfig,
    GatewayConfig,
    InferenceBackend,
    LocalBackend,
    ModelMetadata,
    RunningServer,
    TensorMetadata,
    create_app,
    decode_bytes_elements,
    encode_bytes_elements,
    serve_app,
)

httpx = pytest.importorskip("httpx")
tclient = pytest.importorskip("tritonclient.http")
ml_dtypes = pytest.importorskip("ml_dtypes")  # numpy's bfloat16, installed with tritonclient

pytestmark = pytest.mark.timeout(60)

NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64, "BF16": ml_dtypes.bfloat16}
TORCH = {"BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
         "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32, "INT64": torch.int64,
         "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64, "BF16": torch.bfloat16}


class Identity(nn.Module):
    """Returns every keyword input under ``<name>_out``: a round trip of every datatype."""

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{k}_out": v.clone() for k, v in inputs.items()}


class Echo(InferenceBackend):
    """A BYTES model: returns each string upper-cased and its length."""

    name, max_batch_size = "echo", 8

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(name=self.name, inputs=(TensorMetadata(name="text", datatype="BYTES", shape=(-1,)),),
                             outputs=(TensorMetadata(name="upper", datatype="BYTES", shape=(-1,)),
                                      TensorMetadata(name="length", datatype="INT64", shape=(-1,))))

    def ready(self) -> bool:
        return True

    async def infer(self, inputs):  # type: ignore[no-untyped-def]
        items = inputs["text"].tolist()
        upper = np.empty(len(items), dtype=object)
        upper[:] = [s.upper() for s in items]
        return {"upper": upper, "length": torch.tensor([len(s) for s in items])}


class Gated(InferenceBackend):
    """y = 2x that blocks until ``gate`` opens; records every batch it receives."""

    name, max_batch_size = "gated", 4

    def __init__(self) -> None:
        self.gate, self.batches, self.is_ready = threading.Event(), [], True

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(name=self.name, inputs=(TensorMetadata(name="x", datatype="FP32", shape=(-1, 2)),),
                             outputs=(TensorMetadata(name="y", datatype="FP32", shape=(-1, 2)),))

    def ready(self) -> bool:
        return self.is_ready

    async def infer(self, inputs):  # type: ignore[no-untyped-def]
        self.batches.append(inputs["x"].clone())
        await asyncio.to_thread(self.gate.wait, 20)
        return {"y": inputs["x"] * 2}


def _wait_until(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 4)


@pytest.fixture(scope="module")
def server(linear: nn.Linear) -> Iterator[RunningServer]:
    examples = {f"x_{dt.lower()}": torch.zeros(2, 3, dtype=t) for dt, t in TORCH.items()}
    backends = [LocalBackend(linear, name="linear", example_inputs=torch.randn(2, 8), max_batch_size=16),
                LocalBackend(Identity(), name="identity", example_inputs=examples, max_batch_size=8), Echo()]
    with serve_app(create_app(backends)) as running:
        yield running


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture()
def triton(server: RunningServer) -> Iterator[tclient.InferenceServerClient]:
    client = tclient.InferenceServerClient(server.address, connection_timeout=10, network_timeout=10)
    yield client
    client.close()


def _metric(server: RunningServer, http: httpx.Client, line_prefix: str) -> float:
    text = http.get("/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix)]
    assert len(values) <= 1, f"{line_prefix!r} more than once in /metrics"
    return values[0] if values else 0.0  # a labelled series appears once first observed


# ------------------------------------------------------------------------------------------------- metadata, health
def test_health_metadata_and_readiness(server: RunningServer, http: httpx.Client,
                                       triton: tclient.InferenceServerClient) -> None:
    assert server.url.startswith("http://127.0.0.1:") and server.port > 0
    assert http.get("/v2/health/live").status_code == 200
    assert http.get("/v2/health/ready").status_code == 200
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "stagewise" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata("linear")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert model["outputs"] == [{"name": "output_0", "datatype": "FP32", "shape": [-1, 4]}]
    assert triton.get_model_metadata("linear", model_version="1") == model
    assert triton.is_model_ready("linear") and triton.is_model_ready("echo", model_version="1")
    assert http.get("/v2/models/identity").json()["inputs"][12] == {"name": "x_bf16", "datatype": "BF16",
                                                                    "shape": [-1, 3]}
    assert http.get("/v2/models/linear/versions/1/ready").status_code == 200
    assert http.get("/v2/models/linear/versions/7/ready").status_code == 404
    assert http.get("/v2/models/nope/ready").status_code == 404


# ------------------------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_inference_matches_the_model(binary: bool, linear: nn.Linear,
                                                  triton: tclient.InferenceServerClient) -> None:
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    inp = tclient.InferInput("input", [5, 8], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    result = triton.infer("linear", [inp], outputs=[tclient.InferRequestedOutput("output_0", binary_data=binary)],
                          request_id="req-1", model_version="1")
    assert result.get_response()["id"] == "req-1"
    assert ("binary_data_size" in str(result.get_output("output_0"))) == binary
    np.testing.assert_allclose(result.as_numpy("output_0"), linear(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_every_numeric_datatype_round_trips(binary: bool, triton: tclient.InferenceServerClient,
                                            http: httpx.Client) -> None:
    rng = np.random.default_rng(2)
    arrays: dict[str, np.ndarray] = {}
    for dt, np_type in NUMPY.items():
        if dt == "BOOL":
            arrays[dt] = rng.random((2, 3)) > 0.5
        elif dt in ("FP16", "FP32", "FP64", "BF16"):
            arrays[dt] = (rng.integers(-512, 512, (2, 3)) / 8).astype(np_type)  # exact in every float type
        else:
            info = np.iinfo(np_type)
            arrays[dt] = np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=np_type)
    inputs = []
    for dt, arr in arrays.items():
        inp = tclient.InferInput(f"x_{dt.lower()}", [2, 3], dt)
        inp.set_data_from_numpy(arr, binary_data=binary or dt == "BF16")  # tritonclient sends BF16 only as binary
        inputs.append(inp)
    outputs = [tclient.InferRequestedOutput(f"x_{dt.lower()}_out", binary_data=binary) for dt in arrays]
    result = triton.infer("identity", inputs, outputs=outputs)
    for dt, arr in arrays.items():
        got = result.as_numpy(f"x_{dt.lower()}_out")
        assert result.get_output(f"x_{dt.lower()}_out")["datatype"] == dt
        assert got.dtype == arr.dtype and np.array_equal(got, arr), dt
    if not binary:  # BF16 as plain JSON floats too, through a raw client
        doc = {"inputs": [{"name": f"x_{dt.lower()}", "shape": [2, 3], "datatype": dt,
                           "data": arr.astype(np.float32 if dt == "BF16" else arr.dtype).tolist()}
                          for dt, arr in arrays.items()], "outputs": [{"name": "x_bf16_out"}]}
        out = http.post("/v2/models/identity/infer", json=doc).json()["outputs"]
        assert len(out) == 1 and out[0]["data"] == arrays["BF16"].astype(np.float32).reshape(-1).tolist()


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_model_round_trips(binary: bool, triton: tclient.InferenceServerClient) -> None:
    text = np.array([b"abc", b"", "h\u00e9".encode()], dtype=object)
    inp = tclient.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(text, binary_data=binary)
    outputs = [tclient.InferRequestedOutput(n, binary_data=binary) for n in ("upper", "length")]
    result = triton.infer("echo", [inp], outputs=outputs)
    upper = [v if isinstance(v, bytes) else v.encode() for v in result.as_numpy("upper").tolist()]
    assert upper == [b"ABC", b"", "H\u00e9".encode()]
    assert result.as_numpy("length").tolist() == [3, 0, 3]


def test_raw_binary_request_and_default_outputs(http: httpx.Client, linear: nn.Linear) -> None:
    x = np.arange(16, dtype=np.float32).reshape(2, 8) / 10
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = http.post("/v2/models/linear/infer", content=header + x.tobytes(),
                  headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:n])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 32} and len(r.content) == n + 32
    y = np.frombuffer(r.content[n:], dtype="<f4").reshape(2, 4)
    np.testing.assert_allclose(y, linear(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    gz = http.post("/v2/models/linear/infer", headers={"Content-Encoding": "gzip"}, content=gzip.compress(
        json.dumps({"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": x.tolist()}]}).encode()))
    assert gz.status_code == 200 and gz.headers["content-type"] == "application/json"
    np.testing.assert_allclose(np.array(gz.json()["outputs"][0]["data"]).reshape(2, 4), y, atol=1e-6)


def test_concurrent_clients_get_their_own_answers_in_shared_batches(server: RunningServer, http: httpx.Client,
                                                                    linear: nn.Linear) -> None:
    before_batches = _metric(server, http, 'stagewise_batch_size_count{model="linear"}')
    before_rows = _metric(server, http, 'stagewise_batch_size_sum{model="linear"}')
    errors: list[str] = []
    per_thread = 12

    def json_client(seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        with httpx.Client(base_url=server.url, timeout=20) as c:
            for _ in range(per_thread):
                x = rng.standard_normal((1, 8)).astype(np.float32)
                doc = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": x.tolist()}]}
                r = c.post("/v2/models/linear/infer", json=doc)
                want = linear(torch.from_numpy(x)).detach().numpy().reshape(-1)
                got = np.array(r.json()["outputs"][0]["data"], dtype=np.float32) if r.status_code == 200 else None
                if got is None or not np.allclose(got, want, atol=1e-5):
                    errors.append(f"thread {seed}: {r.status_code} {r.text[:200]}")

    def binary_client(seed: int) -> None:  # tritonclient, binary tensors both ways, one client per thread
        rng = np.random.default_rng(100 + seed)
        c = tclient.InferenceServerClient(server.address, network_timeout=20)
        try:
            for _ in range(per_thread):
                x = rng.standard_normal((1, 8)).astype(np.float32)
                inp = tclient.InferInput("input", [1, 8], "FP32")
                inp.set_data_from_numpy(x)
                got = c.infer("linear", [inp]).as_numpy("output_0")
                want = linear(torch.from_numpy(x)).detach().numpy()
                if not np.allclose(got, want, atol=1e-5):
                    errors.append(f"thread {seed}: {got} != {want}")
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(f"thread {seed}: {exc!r}")
        finally:
            c.close()

    def client(seed: int) -> None:
        (binary_client if seed % 2 else json_client)(seed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(45)
    assert not any(t.is_alive() for t in threads) and not errors, errors[:3]
    batches = _metric(server, http, 'stagewise_batch_size_count{model="linear"}') - before_batches
    rows = _metric(server, http, 'stagewise_batch_size_sum{model="linear"}') - before_rows
    assert rows == 16 * per_thread
    assert batches < rows, "no two requests ever shared a batch"
    assert _metric(server, http, 'stagewise_queue_depth{model="linear"}') == 0


# ------------------------------------------------------------------------------------------------------ bad inputs
def _infer_doc(name: str = "input", shape: list[int] | None = None, datatype: str = "FP32", n: int | None = None,
               **extra: object) -> dict:
    shape = shape or [1, 8]
    count = n if n is not None else int(np.prod(shape))
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": [0.5] * count}], **extra}


BAD = [
    ("/v2/models/nope/infer", _infer_doc(), 404, "unknown model 'nope'"),
    ("/v2/models/linear/versions/3/infer", _infer_doc(), 404, "no version '3'"),
    ("/v2/models/linear/infer", _infer_doc(name="inp"), 400, "unknown input 'inp'"),
    ("/v2/models/identity/infer", _infer_doc(name="x_fp32", shape=[1, 3]), 400, "missing input 'x_bool'"),
    ("/v2/models/linear/infer", _infer_doc(shape=[1, 7]), 400, "expects [-1, 8]"),
    ("/v2/models/linear/infer", _infer_doc(datatype="FP64"), 400, "datatype FP64 but model 'linear' expects FP32"),
    ("/v2/models/linear/infer", _infer_doc(n=7), 400, "has 7 values but shape [1, 8] needs 8"),
    ("/v2/models/linear/infer", _infer_doc(shape=[17, 8]), 400, "at most 16 per request"),
    ("/v2/models/linear/infer", _infer_doc(outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    ("/v2/models/linear/infer", b'{"inputs": [', 400, "not valid JSON"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD)
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_healthy(http: httpx.Client, path: str, body: object,
                                                                   status: int, message: str) -> None:
    r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert http.get("/v2/health/ready").status_code == 200


def test_binary_size_mismatch_and_tritonclient_errors(http: httpx.Client,
                                                      triton: tclient.InferenceServerClient) -> None:
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 30}}]}).encode()
    r = http.post("/v2/models/linear/infer", content=header + b"\0" * 30,
                  headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and "binary_data_size 30" in r.json()["error"] and "needs 32 bytes" in r.json()["error"]
    r = http.post("/v2/models/linear/infer", content=header + b"\0" * 32,
                  headers={"Inference-Header-Content-Length": "x"})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
    inp = tclient.InferInput("input", [1, 8], "INT32")
    inp.set_data_from_numpy(np.zeros((1, 8), dtype=np.int32))
    with pytest.raises(tclient.InferenceServerException, match="expects FP32") as info:
        triton.infer("linear", [inp])
    assert info.value.status() == "400"
    assert triton.is_server_ready()


# ---------------------------------------------------------------------------------------- limits, auth, backpressure
def test_payload_limit_is_413_by_header_while_reading_and_after_inflating() -> None:
    backend = LocalBackend(nn.Linear(8, 4), name="linear", example_inputs=torch.randn(2, 8))
    with serve_app(create_app(backend, config=GatewayConfig(max_payload_bytes=2048))) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as http:
        small = http.post("/v2/models/linear/infer", json=_infer_doc())
        assert small.status_code == 200
        r = http.post("/v2/models/linear/infer", content=b" " * 4096)
        assert r.status_code == 413 and "4096 bytes exceeds the limit of 2048" in r.json()["error"]
        chunked = http.post("/v2/models/linear/infer", content=iter([b" " * 1024] * 4))  # no Content-Length
        assert chunked.status_code == 413 and "exceeds the limit of 2048" in chunked.json()["error"]
        bomb = http.post("/v2/models/linear/infer", content=gzip.compress(b" " * 100_000),
                         headers={"Content-Encoding": "gzip"})
        assert bomb.status_code == 413 and "decompressed" in bomb.json()["error"]
        assert http.get("/v2/health/ready").status_code == 200


def test_bearer_token_guards_everything_but_health() -> None:
    backend = LocalBackend(nn.Linear(8, 4), name="linear", example_inputs=torch.randn(2, 8))
    with serve_app(create_app(backend, config=GatewayConfig(auth_token="s3cret"))) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as http:
        assert http.get("/v2/health/live").status_code == 200 and http.get("/v2/health/ready").status_code == 200
        for path in ("/v2", "/v2/models/linear", "/metrics", "/v2/models/linear/ready"):
            r = http.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "bearer token" in r.json()["error"]
        wrong = http.post("/v2/models/linear/infer", json=_infer_doc(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "invalid bearer token" in wrong.json()["error"]
        good = {"Authorization": "Bearer s3cret"}
        assert http.get("/v2", headers=good).status_code == 200
        assert http.post("/v2/models/linear/infer", json=_infer_doc(), headers=good).status_code == 200
        triton = tclient.InferenceServerClient(srv.address)
        try:
            inp = tclient.InferInput("input", [1, 8], "FP32")
            inp.set_data_from_numpy(np.ones((1, 8), dtype=np.float32))
            assert triton.infer("linear", [inp], headers=good).as_numpy("output_0").shape == (1, 4)
            with pytest.raises(tclient.InferenceServerException, match="bearer"):
                triton.infer("linear", [inp])
        finally:
            triton.close()


def _post_x(url: str, value: float, results: dict[float, httpx.Response], **params: object) -> threading.Thread:
    doc = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [value, value]}],
           "parameters": params}

    def send() -> None:
        with httpx.Client(base_url=url, timeout=20) as c:
            results[value] = c.post("/v2/models/gated/infer", json=doc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_full_queue_is_503_timeouts_are_504_and_dropped_requests_never_run() -> None:
    backend = Gated()
    app = create_app(backend, config=GatewayConfig(batching=BatchingConfig(max_queue_size=1, max_delay_ms=0)))
    batcher = app.state.gateway.batchers["gated"]
    results: dict[float, httpx.Response] = {}
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as http:
        try:
            first = _post_x(srv.url, 1.0, results)
            _wait_until(lambda: len(backend.batches) == 1, "the first request to reach the backend")
            late = _post_x(srv.url, 2.0, results, timeout=200_000)  # 0.2 s, in microseconds as Triton sends it
            _wait_until(lambda: batcher.queue_depth == 1, "the second request to queue")
            full = http.post("/v2/models/gated/infer", json={"inputs": [{"name": "x", "shape": [1, 2],
                                                                         "datatype": "FP32", "data": [3, 3]}]})
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            assert "queue is full" in full.json()["error"]
            late.join(10)
            assert results[2.0].status_code == 504 and "did not answer within 0.2 s" in results[2.0].json()["error"]
            assert batcher.queue_depth == 0
            with pytest.raises(httpx.ReadTimeout):  # this client gives up; the server must drop its request
                with httpx.Client(base_url=srv.url, timeout=0.3) as impatient:
                    impatient.post("/v2/models/gated/infer", json={"inputs": [{"name": "x", "shape": [1, 2],
                                                                               "datatype": "FP32", "data": [4, 4]}]})
            registry = app.state.gateway.metrics.registry
            _wait_until(lambda: registry.get_sample_value("stagewise_requests_total",
                                                          {"model": "gated", "status": "499"}) == 1.0,
                        "the server to notice the disconnect")
            assert http.get("/v2/health/live").status_code == 200
        finally:
            backend.gate.set()
            first.join(10)
        assert results[1.0].status_code == 200 and results[1.0].json()["outputs"][0]["data"] == [2.0, 2.0]
        after = http.post("/v2/models/gated/infer", json={"inputs": [{"name": "x", "shape": [1, 2],
                                                                      "datatype": "FP32", "data": [5, 5]}]})
        assert after.status_code == 200
        backend.is_ready = False  # e.g. a pipeline worker restarting
        assert http.get("/v2/health/ready").status_code == 503 and http.get("/v2/models/gated/ready").status_code == 503
        refused = http.post("/v2/models/gated/infer", json={"inputs": [{"name": "x", "shape": [1, 2],
                                                                        "datatype": "FP32", "data": [6, 6]}]})
        assert refused.status_code == 503 and "not ready" in refused.json()["error"]
        assert http.get("/v2/health/live").status_code == 200
    assert [b[0, 0].item() for b in backend.batches] == [1.0, 5.0]  # 2.0 timed out, 4.0 left: neither ran
    assert registry.get_sample_value("stagewise_errors_total", {"model": "gated", "reason": "GatewayTimeout"}) == 1.0


def test_metrics_expose_requests_latency_batches_and_stage_times(server: RunningServer, http: httpx.Client) -> None:
    r = http.post("/v2/models/linear/infer", json=_infer_doc())
    assert r.status_code == 200
    http.post("/v2/models/linear/infer", json=_infer_doc(n=3))
    server_app_metrics = _metric(server, http, 'stagewise_requests_total{model="linear",status="200"}')
    assert server_app_metrics >= 1
    assert _metric(server, http, 'stagewise_request_latency_seconds_count{model="linear"}') >= 2
    assert _metric(server, http, 'stagewise_errors_total{model="linear",reason="BadRequest"}') >= 1
    text = http.get("/metrics").text
    assert "stagewise_batch_size_bucket" in text and "stagewise_queue_depth" in text


def test_stage_time_api_and_bytes_helpers_agree_with_the_wire() -> None:
    backend = LocalBackend(nn.Linear(8, 4), name="linear", example_inputs=torch.randn(2, 8))
    app = create_app(backend)
    app.state.gateway.metrics.observe_stage_time("linear", "layers.0", 0.004)
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=10) as http:
        text = http.get("/metrics").text
    assert 'stagewise_stage_seconds_count{model="linear",stage="layers.0"} 1.0' in text
    assert not srv.running
    blob = encode_bytes_elements([b"x", b"yz"])
    assert decode_bytes_elements(blob) == [b"x", b"yz"]


RUN_SCRIPT = """
import sys, torch
from torch import nn
from stagewise.serve import LocalBackend, create_app, run
app = create_app(LocalBackend(nn.Linear(8, 4), name="linear", example_inputs=torch.randn(2, 8)))
run(app, "127.0.0.1", int(sys.argv[1]), log_level="warning")
print("clean-exit", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_blocking_run_stops_cleanly_on_ctrl_c() -> None:
    with socket.socket() as s:  # a free port for the child (tiny race, acceptable in tests)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1)
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "child exited"
            try:
                return http.get("/v2/health/ready").status_code == 200
            except httpx.TransportError:
                time.sleep(0.05)
                return False

        _wait_until(up, "the child server to come up", timeout_s=40)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "clean-exit" in out, err[-2000:]
    finally:
        http.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
