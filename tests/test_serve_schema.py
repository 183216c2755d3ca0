"""Hostile and unlucky requests against a live gateway (uvicorn on a free 127.0.0.1 port), and schemathesis driving
the server's own OpenAPI document: whatever a client sends, the answer is never a 5xx and never invalid JSON."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from stagewise.serve import GatewayConfig, LocalBackend, PipelineBackend, RunningServer, create_app, serve_app

httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")
tclient = pytest.importorskip("tritonclient.http")
hypothesis = pytest.importorskip("hypothesis")  # comes with schemathesis
positive_data_acceptance = pytest.importorskip("schemathesis.specs.openapi.checks").positive_data_acceptance

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 25  # per operation (10; schemathesis skips the document itself): ~15 s on a small machine


class Log(nn.Module):
    """log(x): NaN for x < 0 and -inf for 0, so non-finite outputs come up on their own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def _strict_json(text: str) -> object:
    """``json.loads`` that refuses the bare NaN/Infinity tokens Python's parser would accept."""

    def refuse(token: str) -> None:
        raise ValueError(f"bare {token} is not JSON (RFC 8259)")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """Two in-process models and a two-stage pipeline of worker processes, behind one token."""
    torch.manual_seed(0)
    pipeline = PipelineBackend("stagewise.zoo.basic:mlp", stages=2, replicas=1, max_batch_size=8)
    try:
        pipeline.wait_ready(60)
        backends = [LocalBackend(nn.Linear(8, 4), name="linear", example_inputs=torch.randn(2, 8), max_batch_size=16),
                    LocalBackend(Log(), name="log", example_inputs=torch.ones(2, 3), max_batch_size=8), pipeline]
        with serve_app(create_app(backends, config=GatewayConfig(auth_token=TOKEN))) as running:
            yield running
    finally:
        pipeline.shutdown()


@pytest.fixture()
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10, headers=AUTH) as client:
        yield client


def _doc(data: object, *, shape: list[int] | None = None, **params: object) -> dict:
    return {"inputs": [{"name": "input", "shape": shape or [1, 8], "datatype": "FP32", "data": data}],
            "parameters": params}


def _raw(data: bytes) -> bytes:
    return b'{"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": %s}]}' % data


HOSTILE = [
    (json.dumps(_doc([0.5] * 8, timeout=1)).encode(), 504, "did not answer"),  # 1 us: expires in the queue
    (_raw(b"[" * 5000 + b"]" * 5000), 400, "nested too deeply"),
    (_raw(b"[1, [2, 3], 4, 5, 6, 7, 8, 9]"), 400, "mixes numbers and lists"),
    (_raw(b"[[1, 2, 3], [4, 5, 6, 7, 8]]"), 400, "nested 'data' does not match shape [1, 8]"),
    (_raw(b"[NaN, 1, 1, 1, 1, 1, 1, 1]"), 400, "input 'input': a value is NaN, infinite or outside the FP32 range"),
    (_raw(b"[1e309, 1, 1, 1, 1, 1, 1, 1]"), 400, "input 'input': a value is NaN, infinite"),
]


@pytest.mark.parametrize(("body", "status", "message"), HOSTILE, ids=["deadline", "deep", "mixed", "ragged", "nan",
                                                                      "overflow"])
def test_hostile_bodies_get_a_json_4xx_or_504_every_time(http: httpx.Client, body: bytes, status: int,
                                                         message: str) -> None:
    for _ in range(5):  # the deadline race used to hit on every try
        r = http.post("/v2/models/linear/infer", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
        assert message in _strict_json(r.text)["error"]
    assert http.get("/v2/health/ready").status_code == 200


def test_content_type_must_be_json_or_the_binary_extension(http: httpx.Client) -> None:
    body = json.dumps(_doc([0.5] * 8)).encode()
    for bad in ("text/plain", "application/x-www-form-urlencoded"):  # the latter is curl -d's default
        r = http.post("/v2/models/linear/infer", content=body, headers={"Content-Type": bad})
        assert r.status_code == 415 and f"Content-Type '{bad}' is not supported" in r.json()["error"]
    for good in ("application/json", "application/json; charset=utf-8", "application/octet-stream"):
        assert http.post("/v2/models/linear/infer", content=body, headers={"Content-Type": good}).status_code == 200
    assert http.post("/v2/models/linear/infer", content=body).status_code == 200  # none (tritonclient sends none)
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 32}}]}).encode()
    r = http.post("/v2/models/linear/infer", content=header + np.ones(8, np.float32).tobytes(),
                  headers={"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"


def test_non_finite_outputs_are_null_in_json_and_exact_in_binary(server: RunningServer, http: httpx.Client) -> None:
    r = http.post("/v2/models/log/infer", json={"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                                                            "data": [-1.0, 0.0, 1.0]}]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert _strict_json(r.text)["outputs"][0]["data"] == [None, None, 0.0]
    triton = tclient.InferenceServerClient(server.address, connection_timeout=10, network_timeout=10)
    try:
        inp = tclient.InferInput("x", [1, 3], "FP32")
        inp.set_data_from_numpy(np.array([[-1.0, 0.0, 1.0]], dtype=np.float32), binary_data=False)
        as_json = triton.infer("log", [inp], headers=AUTH, outputs=[tclient.InferRequestedOutput(
            "output_0", binary_data=False)]).as_numpy("output_0")
        assert np.isnan(as_json[0, :2]).all() and as_json[0, 2] == 0.0  # the client reads null as NaN
        exact = triton.infer("log", [inp], headers=AUTH).as_numpy("output_0")
        assert np.isnan(exact[0, 0]) and exact[0, 1] == -np.inf and exact[0, 2] == 0.0
    finally:
        triton.close()


def test_openapi_document_covers_every_route_and_needs_the_token(server: RunningServer, http: httpx.Client) -> None:
    assert httpx.get(server.url + "/v2/openapi.json", timeout=10).status_code == 401
    doc = _strict_json(http.get("/v2/openapi.json").text)
    assert doc["openapi"].startswith("3.1") and doc["security"] == [{"bearer": []}]
    paths = doc["paths"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/openapi.json", "/metrics", "/v2/models/{name}",
                 "/v2/models/{name}/ready", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert path in paths, path
    assert paths["/v2/health/live"]["get"]["security"] == []
    infer = paths["/v2/models/{name}/infer"]
    assert infer["parameters"][0]["schema"]["enum"] == ["linear", "log", "mlp"]
    for name, example in infer["post"]["requestBody"]["content"]["application/json"]["examples"].items():
        assert http.post(f"/v2/models/{name}/infer", json=example["value"]).status_code == 200  # examples are valid


def test_schemathesis_finds_no_5xx_and_no_invalid_json(server: RunningServer) -> None:
    """Every operation of the live document: its examples, schema-valid and schema-violating requests (bounded)."""
    schema = schemathesis.openapi.from_url(server.url + "/v2/openapi.json", headers=AUTH, timeout=10)
    seen: collections.Counter[str] = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/unload"):  # it takes the model away on purpose (test_serve_live_update)
            continue
        cases = hypothesis.strategies.one_of([operation.as_strategy(mode) for mode in schemathesis.GenerationMode]
                                             + schema.get_strategies_from_examples(operation))

        @hypothesis.given(case=cases)
        @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(headers=AUTH, timeout=10)
            seen[f"{case.method} {case.formatted_path} {response.status_code}"] += 1
            assert response.status_code < 500, (f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                                f"{response.text[:300]}")
            if response.headers.get("content-type", [""])[0].startswith("application/json"):  # header -> values
                _strict_json(response.text)
            # and schemathesis's own checks (status codes, content types, response schemas, negative data rejected),
            # but for "a schema-valid request is accepted": no schema can tie len(data) to the product of shape
            case.validate_response(response, headers=AUTH, excluded_checks=[positive_data_acceptance])

        check()
    assert sum(seen.values()) >= 100, seen
    for model in ("linear", "log", "mlp"):  # every model answered (mlp: the pipeline's worker processes)
        assert any(k.startswith(f"POST /v2/models/{model}/") and k.endswith("/infer 200") for k in seen), seen
    assert any(" 400" in k for k in seen) and any(" 404" in k for k in seen), seen
