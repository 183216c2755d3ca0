"""Serving without sockets: v2 wire format, input validation, the dynamic batcher and LocalBackend's signature."""

from __future__ import annotations

import asyncio
import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

import stagewise.serve as serve
from stagewise.serve import (
    BackendError,
    BadRequestError,
    BatchingConfig,
    ClientDisconnectedError,
    DynamicBatcher,
    GatewayTimeoutError,
    InferenceBackend,
    LocalBackend,
    ModelMetadata,
    ServiceUnavailableError,
    TensorMetadata,
    decode_bytes_elements,
    encode_bytes_elements,
    encode_infer_response,
    parse_infer_request,
    should_wait,
    validate_inputs,
)

tritonclient_utils = pytest.importorskip("tritonclient.utils")
InferResult = pytest.importorskip("tritonclient.http").InferResult


# ------------------------------------------------------------------------------------------------------------ BYTES
def test_bytes_elements_round_trip_and_match_tritonclient() -> None:
    items = [b"", b"hello", "h\u00e9".encode(), bytes(range(256)), b"\x00\x00"]
    blob = encode_bytes_elements(items)
    assert blob[:4] == struct.pack("<I", 0) and blob[4:8] == struct.pack("<I", 5) and blob[8:13] == b"hello"
    assert decode_bytes_elements(blob) == items
    theirs = tritonclient_utils.serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert theirs == blob
    assert list(tritonclient_utils.deserialize_bytes_tensor(blob)) == items
    with pytest.raises(BadRequestError, match="truncated"):
        decode_bytes_elements(blob[:-1])
    with pytest.raises(BadRequestError, match="length prefix"):
        decode_bytes_elements(blob + b"\x01\x00")


def _body(inputs: list[dict], blobs: list[bytes] | None = None, **extra: object) -> tuple[bytes, int | None]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return (header + b"".join(blobs), len(header)) if blobs is not None else (header, None)


def test_bytes_inputs_decode_in_json_and_binary_form() -> None:
    body, n = _body([{"name": "s", "shape": [2, 1], "datatype": "BYTES", "data": ["ab", "\u00e9"]}])
    value = parse_infer_request(body, n).inputs[0].value
    assert isinstance(value, np.ndarray) and value.shape == (2, 1) and value.tolist() == [[b"ab"], ["\u00e9".encode()]]
    blob = encode_bytes_elements([b"\xff\x00", b"x"])
    body, n = _body([{"name": "s", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}],
                    [blob])
    assert parse_infer_request(body, n).inputs[0].value.tolist() == [b"\xff\x00", b"x"]
    body, n = _body([{"name": "s", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}],
                    [blob])
    with pytest.raises(BadRequestError, match="2 BYTES elements but shape"):
        parse_infer_request(body, n)


# --------------------------------------------------------------------------------------------------------- numerics
ALL = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64",
       "BF16"]


def _sample(datatype: str) -> torch.Tensor:
    dtype = serve.DATATYPES[datatype][0]
    if datatype == "BOOL":
        return torch.tensor([[True, False, True], [False, False, True]])
    if dtype.is_floating_point:
        return torch.tensor([[0.5, -1.25, 3.0], [1024.0, -0.0, 0.125]], dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.tensor([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=dtype)


@pytest.mark.parametrize("datatype", ALL)
def test_every_numeric_datatype_decodes_from_json_and_binary(datatype: str) -> None:
    expected = _sample(datatype)
    data = expected.float().tolist() if datatype in ("FP16", "BF16") else expected.tolist()
    body, n = _body([{"name": "x", "shape": [2, 3], "datatype": datatype, "data": data}])
    got = parse_infer_request(body, n).inputs[0].value
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    flat = [v for row in data for v in row]  # flat data is as valid as nested
    body, n = _body([{"name": "x", "shape": [2, 3], "datatype": datatype, "data": flat}])
    assert torch.equal(parse_infer_request(body, n).inputs[0].value, expected)
    raw = expected.view(torch.uint16) if datatype == "BF16" else expected
    blob = raw.numpy().tobytes()  # little-endian host
    spec = {"name": "x", "shape": [2, 3], "datatype": datatype, "parameters": {"binary_data_size": len(blob)}}
    body, n = _body([spec], [blob])
    got = parse_infer_request(body, n).inputs[0].value
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("datatype", ["BOOL", "INT8", "UINT64", "FP16", "FP32", "BF16"])
@pytest.mark.parametrize("binary", [False, True])
def test_responses_decode_with_tritonclient(datatype: str, binary: bool) -> None:
    value = _sample(datatype)
    strings = np.array([b"a", b"\xff"], dtype=object).reshape(2, 1)
    outputs = [("y", value, binary), ("s", strings, True)]
    body, n = encode_infer_response(model_name="m", model_version="1", request_id="r7", outputs=outputs)
    assert n is not None  # "s" is binary, so the extension is used
    result = InferResult.from_response_body(body, header_length=n)
    assert result.get_response()["id"] == "r7" and result.get_response()["model_name"] == "m"
    got = result.as_numpy("y")
    expected = value.float().numpy() if datatype == "BF16" else value.numpy()
    assert got.shape == (2, 3) and np.array_equal(got.astype(expected.dtype), expected)
    assert result.as_numpy("s").tolist() == [[b"a"], [b"\xff"]]
    body, n = encode_infer_response(model_name="m", model_version="1", request_id=None, outputs=[("y", value, False)])
    assert n is None and "id" not in json.loads(body)
    assert json.loads(body)["outputs"][0]["data"] == value.reshape(-1).tolist()
    with pytest.raises(BadRequestError, match="not UTF-8"):
        encode_infer_response(model_name="m", model_version="1", request_id=None, outputs=[("s", strings, False)])


@pytest.mark.parametrize(("inputs", "blobs", "header", "match"), [
    ([{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0]}], None, None, "has 1 values but shape"),
    ([{"name": "x", "shape": [1, 2], "datatype": "FP9", "data": [1, 2]}], None, None, "unknown datatype 'FP9'"),
    ([{"name": "x", "shape": [1, -2], "datatype": "FP32", "data": [1, 2]}], None, None, "non-negative integers"),
    ([{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 300]}], None, None, "outside the INT8 range"),
    ([{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2.5]}], None, None, "must be integers"),
    ([{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, "a"]}], None, None, "must be numbers"),
    ([{"name": "x", "shape": [2], "datatype": "BOOL", "data": [1, 2]}], None, None, "true/false"),
    ([{"name": "x", "shape": [2], "datatype": "FP32"}], None, None, "neither 'data' nor"),
    ([{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}] * 2, None, None, "more than once"),
    ([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}], [b"\0" * 4], None,
     "needs 8 bytes"),
    ([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}], [b"\0" * 6], None,
     "add up to 4"),
    ([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}], [b"\0" * 4], None,
     "only 4 bytes"),
    ([{"name": "x", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}}], [b"\x01\x02"], None,
     "other than 0 and 1"),
    ([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], [b""], 10_000, "Inference-Header-Content-Length"),
])
def test_malformed_requests_are_rejected_with_a_reason(inputs: list[dict], blobs: list[bytes] | None,
                                                       header: int | None, match: str) -> None:
    body, n = _body(inputs, blobs)
    with pytest.raises(BadRequestError, match=match):
        parse_infer_request(body, header if header is not None else n)


def test_bad_json_and_requested_outputs() -> None:
    with pytest.raises(BadRequestError, match="not valid JSON"):
        parse_infer_request(b"{inputs: ", None)
    with pytest.raises(BadRequestError, match="non-empty 'inputs'"):
        parse_infer_request(b"{}", None)
    body, _ = _body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                    outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": True}}],
                    parameters={"binary_data_output": False}, id="q")
    req = parse_infer_request(body, None)
    assert req.id == "q" and [(o.name, o.binary) for o in req.outputs or []] == [("a", False), ("b", True)]


@pytest.mark.parametrize(("data", "match"), [
    ([[1, 2, 3], [4, 5, 6, 7, 8]], r"at depth 0 it has a list of 2 values where the shape says 1"),  # ragged
    ([[[1, 2, 3, 4], [5, 6, 7, 8]]], r"at depth 1 it has a list of 2 values where the shape says 8"),
    ([[[1], [2], [3], [4], [5], [6], [7], [8]]], "nested deeper than shape"),
    ([[1, 2, 3, 4, 5, 6, 7, [8]]], "mixes numbers and lists"),
    ([1, [2, 3], 4, 5, 6, 7, 8, 9], "mixes numbers and lists"),
    ([1, 2, 3, 4, 5, 6, 7, {"a": 1}], "must be numbers"),
])
def test_ragged_and_mixed_data_are_refused_naming_the_input(data: list, match: str) -> None:
    body, n = _body([{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": data}])
    with pytest.raises(BadRequestError, match=rf"input 'x'.*{match}"):
        parse_infer_request(body, n)


@pytest.mark.parametrize(("literal", "datatype"), [
    ("NaN", "FP32"), ("Infinity", "FP64"), ("-Infinity", "FP16"), ("1e309", "FP64"), ("1e39", "FP32"),
    ("70000", "FP16"), ("3.4e38", "BF16"),
])
def test_non_finite_and_overflowing_json_numbers_are_refused(literal: str, datatype: str) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "%s", "data": [1.5, %s]}]}' % (
        datatype.encode(), literal.encode())
    with pytest.raises(BadRequestError, match=rf"input 'x': a value is NaN, infinite or outside the {datatype} range"):
        parse_infer_request(body, None)
    blob = np.array([np.nan, np.inf], dtype=np.float32).tobytes()  # the binary extension carries them exactly
    body, n = _body([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}], [blob])
    value = parse_infer_request(body, n).inputs[0].value
    assert value[0].isnan() and value[1].isinf()


def test_deeply_nested_json_is_a_400_and_rank_is_bounded() -> None:
    deep = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    with pytest.raises(BadRequestError, match="nested too deeply"):
        parse_infer_request(deep, None)
    params = b'{"parameters": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b'}, "inputs": []}'
    with pytest.raises(BadRequestError, match="nested too deeply"):
        parse_infer_request(params, None)
    rank = serve._protocol.MAX_RANK + 1
    body, n = _body([{"name": "x", "shape": [1] * rank, "datatype": "FP32", "data": [1.0]}])
    with pytest.raises(BadRequestError, match=f"'shape' has {rank} dimensions; at most"):
        parse_infer_request(body, n)
    data: list = [1.0]
    for _ in range(rank - 2):  # nested exactly as the largest shape allowed
        data = [data]
    body, n = _body([{"name": "x", "shape": [1] * (rank - 1), "datatype": "FP32", "data": data}])
    assert parse_infer_request(body, n).inputs[0].value.shape == (1,) * (rank - 1)


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "BF16"])
def test_non_finite_outputs_are_valid_json_null_and_exact_in_binary(datatype: str) -> None:
    value = torch.tensor([[1.5, float("nan")], [float("inf"), -float("inf")]], dtype=serve.DATATYPES[datatype][0])
    body, n = encode_infer_response(model_name="m", model_version="1", request_id=None, outputs=[("y", value, False)])

    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token} in a JSON response")

    doc = json.loads(body, parse_constant=refuse)
    assert n is None and doc["outputs"][0]["data"] == [1.5, None, None, None]
    if datatype != "BF16":  # tritonclient reads null as NaN (its ml_dtypes bfloat16 takes no None)
        got = InferResult.from_response_body(body).as_numpy("y")
        assert got.shape == (2, 2) and got[0, 0] == 1.5 and np.isnan(got[0, 1]) and np.isnan(got[1]).all()
    body, n = encode_infer_response(model_name="m", model_version="1", request_id=None, outputs=[("y", value, True)])
    exact = InferResult.from_response_body(body, header_length=n).as_numpy("y").astype(np.float32)
    assert np.isnan(exact[0, 1]) and exact[1, 0] == np.inf and exact[1, 1] == -np.inf


META = ModelMetadata(name="m", inputs=(TensorMetadata(name="a", datatype="FP32", shape=(-1, 2)),
                                       TensorMetadata(name="b", datatype="INT64", shape=(-1, -1))),
                     outputs=(TensorMetadata(name="y", datatype="FP32", shape=(-1,)),))


def _req(a_shape: list[int], b_shape: list[int], a_type: str = "FP32", names: tuple[str, str] = ("a", "b"),
         outputs: list[dict] | None = None) -> serve.InferRequest:
    inputs = [{"name": names[0], "shape": a_shape, "datatype": a_type, "data": [0] * int(np.prod(a_shape))},
              {"name": names[1], "shape": b_shape, "datatype": "INT64", "data": [0] * int(np.prod(b_shape))}]
    extra = {"outputs": outputs} if outputs is not None else {}
    return parse_infer_request(_body(inputs, **extra)[0], None)


def test_validation_against_metadata() -> None:
    values = validate_inputs(_req([3, 2], [3, 5]), META)
    assert list(values) == ["a", "b"] and values["b"].shape == (3, 5)
    cases = [
        (_req([3, 2], [3, 5], names=("a", "c")), "unknown input 'c'"),
        (_req([3, 2], [3, 5], a_type="FP64"), "datatype FP64 but model 'm' expects FP32"),
        (_req([3, 3], [3, 5]), r"shape \[3, 3\] but model 'm' expects \[-1, 2\]"),
        (_req([3, 2, 1], [3, 5]), "shape"),
        (_req([3, 2], [2, 5]), "has 2 rows"),
        (_req([0, 2], [0, 5]), "0 rows"),
        (_req([1, 2], [1, 1], outputs=[{"name": "z"}]), "unknown output 'z'"),
    ]
    for req, match in cases:
        with pytest.raises(BadRequestError, match=match):
            validate_inputs(req, META)
    one = parse_infer_request(_body([{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}])[0], None)
    with pytest.raises(BadRequestError, match="missing input 'b'"):
        validate_inputs(one, META)


def test_adaptive_wait_policy() -> None:
    assert not should_wait(gap_s=1.0, inflight=0, max_delay_s=0.002)  # lone request on an idle server: go now
    assert should_wait(gap_s=0.001, inflight=0, max_delay_s=0.002)  # dense traffic: more are coming
    assert should_wait(gap_s=1.0, inflight=1, max_delay_s=0.002)  # a batch in flight: requests are flowing
    assert not should_wait(gap_s=0.0, inflight=3, max_delay_s=0.0)  # batching delay disabled


# ---------------------------------------------------------------------------------------------------------- batcher
class Doubler(InferenceBackend):
    """y = 2x, recording the rows of every batch; ``drop_row`` breaks the output contract on purpose."""

    def __init__(self, *, drop_row: bool = False, delay_s: float = 0.0, max_batch_size: int = 8) -> None:
        self.name, self.max_batch_size = "doubler", max_batch_size
        self.drop_row, self.delay_s, self.batches = drop_row, delay_s, []

    def metadata(self) -> ModelMetadata:
        return ModelMetadata(name=self.name, inputs=(TensorMetadata(name="x", datatype="FP32", shape=(-1, 2)),),
                             outputs=(TensorMetadata(name="y", datatype="FP32", shape=(-1, 2)),))

    def ready(self) -> bool:
        return True

    async def infer(self, inputs):  # type: ignore[no-untyped-def]
        x = inputs["x"]
        self.batches.append(x.shape[0])
        await asyncio.sleep(self.delay_s)
        return {"y": (x * 2)[1:] if self.drop_row else x * 2}


def _x(i: int, rows: int = 1) -> dict[str, torch.Tensor]:
    return {"x": torch.full((rows, 2), float(i))}


def test_batcher_concatenates_and_splits_per_request() -> None:
    async def main() -> tuple[list[dict], list[int]]:
        backend = Doubler(delay_s=0.02)
        batcher = DynamicBatcher(backend, BatchingConfig(max_delay_ms=5.0))
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(_x(i, rows=1 + i % 2)) for i in range(10)))
        finally:
            await batcher.stop()
        return results, backend.batches

    results, batches = asyncio.run(main())
    for i, out in enumerate(results):
        assert torch.equal(out["y"], torch.full((1 + i % 2, 2), 2.0 * i))
    assert sum(batches) == 15 and max(batches) > 1 and max(batches) <= 8


def test_batcher_checks_the_backend_contract() -> None:
    async def main() -> None:
        batcher = DynamicBatcher(Doubler(drop_row=True))
        await batcher.start()
        try:
            with pytest.raises(BackendError, match="returned 3 rows for 4 inputs"):
                await batcher.submit(_x(1, rows=4))
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_batcher_limits_timeouts_and_drops() -> None:
    async def main() -> None:
        backend = Doubler(delay_s=0.3, max_batch_size=4)
        batcher = DynamicBatcher(backend, BatchingConfig(max_queue_size=2, max_delay_ms=0))
        await batcher.start()
        try:
            with pytest.raises(BadRequestError, match="at most 4 per request"):
                await batcher.submit(_x(0, rows=5))
            first = asyncio.create_task(batcher.submit(_x(1)))
            await asyncio.sleep(0.05)  # first is in the backend now
            with pytest.raises(GatewayTimeoutError, match="did not answer within 0.05 s"):
                await batcher.submit(_x(2), timeout_s=0.05)
            gone: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            queued = asyncio.create_task(batcher.submit(_x(3), cancel=gone))
            filler = asyncio.create_task(batcher.submit(_x(4)))
            await asyncio.sleep(0.01)
            with pytest.raises(ServiceUnavailableError, match="queue is full") as info:
                await batcher.submit(_x(5))
            assert info.value.retry_after_s == 1
            gone.set_result(None)  # the client of `queued` went away
            with pytest.raises(ClientDisconnectedError):
                await queued
            assert torch.equal((await first)["y"], torch.full((1, 2), 2.0))
            assert torch.equal((await filler)["y"], torch.full((1, 2), 8.0))
            assert backend.batches == [1, 1]  # the timed-out and the abandoned request never ran
        finally:
            await batcher.stop()
        with pytest.raises(ServiceUnavailableError, match="not accepting"):
            await batcher.submit(_x(6))

    asyncio.run(main())


def test_a_deadline_that_passes_in_the_queue_is_a_timeout_not_a_cancellation() -> None:
    async def main() -> None:
        backend = Doubler()
        batcher = DynamicBatcher(backend, BatchingConfig(max_delay_ms=0))
        await batcher.start()
        try:
            for _ in range(20):  # 1 us: the batching loop finds the request expired before the timer fires
                with pytest.raises(GatewayTimeoutError, match="did not answer"):
                    await batcher.submit(_x(1), timeout_s=1e-6)
            assert backend.batches == [] and batcher.queue_depth == 0
            assert torch.equal((await batcher.submit(_x(2)))["y"], torch.full((1, 2), 4.0))
        finally:
            await batcher.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------- LocalBackend
class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(features), mask.long().sum(dim=1)


class DictOut(nn.Module):
    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"logits": ids.float() * 2, "unused": None, "count": ids.sum(dim=1, keepdim=True)}


def test_local_backend_derives_metadata_and_runs() -> None:
    examples = (torch.randn(2, 3), torch.ones(2, 4, dtype=torch.bool))
    backend = LocalBackend(TwoHeads(), name="two", example_inputs=examples, output_names=["score", "n"],
                           max_batch_size=4)
    meta = backend.metadata().to_json()
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 3]},
                              {"name": "mask", "datatype": "BOOL", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1, 2]},
                               {"name": "n", "datatype": "INT64", "shape": [-1]}]
    x, mask = torch.randn(3, 3), torch.tensor([[True, False, True, True]] * 3)
    out = asyncio.run(backend.infer({"features": x, "mask": mask.numpy()}))
    assert torch.allclose(out["score"], backend.model.lin(x).detach(), atol=1e-6) and out["n"].tolist() == [3, 3, 3]
    assert not backend.model.training
    asyncio.run(backend.close())

    d = LocalBackend(DictOut(), name="d", example_inputs={"ids": torch.ones(2, 5, dtype=torch.int32)})
    assert [(t.name, t.datatype, t.shape) for t in d.metadata().outputs] == [("logits", "FP32", (-1, 5)),
                                                                             ("count", "INT64", (-1, 1))]
    with pytest.raises(ValueError, match="BYTES"):
        asyncio.run(d.infer({"ids": np.array([[b"a"]], dtype=object)}))
    asyncio.run(d.close())
    assert not d.ready()
    with pytest.raises(ValueError, match="output_names"):
        LocalBackend(DictOut(), name="d", example_inputs={"ids": torch.ones(2, 5)}, output_names=["nope"])
    with pytest.raises(ValueError, match="batch dim first"):
        LocalBackend(nn.Flatten(0), name="f", example_inputs=torch.ones(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_backend_runs_a_cuda_model_and_answers_on_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    backend = LocalBackend(model.to("cuda"), name="gpu", example_inputs=torch.randn(2, 8))
    x = torch.randn(5, 8)
    out = asyncio.run(backend.infer({"input": x}))["output_0"]
    assert out.device.type == "cpu" and torch.allclose(out, model.cpu()(x).detach(), atol=1e-4)
    asyncio.run(backend.close())
