"""KServe Open Inference Protocol v2 on the wire: errors, datatypes, request parsing and response encoding.

Both body forms are handled: plain JSON (``data`` as a flat or nested row-major list) and the binary tensor data
extension (the ``Inference-Header-Content-Length`` header gives the JSON length; raw little-endian tensor bytes follow
in input order, each input's size in ``parameters.binary_data_size``). BOOL is one byte per element; BYTES elements
are a 4-byte little-endian length followed by the bytes.

JSON carries finite numbers only (RFC 8259 has no NaN or Infinity): a JSON input value that is NaN, infinite or
outside its datatype's range (``NaN``, ``1e309``, ``1e39`` as FP32) is a 400 naming the input, and a non-finite output
value is written as ``null`` (what KServe's orjson and JavaScript's ``JSON.stringify`` write; numpy, tritonclient and
the kserve client read ``null`` in a float array as NaN). Non-finite values travel exactly in the binary extension.
Nested ``data`` must be rectangular and nested exactly as ``shape`` (or flat); anything else is a 400, never a guess.

Decoded tensors are ``torch.Tensor`` for every numeric datatype and a numpy ``object`` array of python ``bytes`` for
BYTES (numpy has no bfloat16, torch has no string tensors).

Exception tree (every class carries the HTTP status the gateway answers with)::

    ServeError                    500  base class
     ├─ BadRequestError           400  malformed body, wrong input name/shape/datatype/size (also a ValueError)
     ├─ UnauthorizedError         401  missing or wrong bearer token
     ├─ ModelNotFoundError        404  unknown model or version
     ├─ PayloadTooLargeError      413  body larger than the configured limit
     ├─ UnsupportedMediaTypeError 415  a Content-Type that is neither JSON nor the binary extension's
     ├─ ServiceUnavailableError   503  queue full, server stopping, model not ready (carries retry_after_s)
     ├─ GatewayTimeoutError       504  request not answered within its timeout
     ├─ ClientDisconnectedError   499  the client went away before its answer (nothing is sent)
     └─ BackendError              500  the backend failed or broke its output contract
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .._errors import StagewiseError

__all__ = [
    "DATATYPES",
    "MAX_RANK",
    "BackendError",
    "BadRequestError",
    "ClientDisconnectedError",
    "GatewayTimeoutError",
    "InferRequest",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "RequestInput",
    "RequestedOutput",
    "ServeError",
    "ServiceUnavailableError",
    "TensorValue",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "datatype_of",
    "decode_bytes_elements",
    "encode_bytes_elements",
    "encode_infer_response",
    "parse_infer_request",
    "rows_of",
]


class ServeError(StagewiseError):
    """Base class of every error the gateway turns into an HTTP answer ``{"error": message}``."""

    status_code: int = 500


class BadRequestError(ServeError, ValueError):
    status_code = 400


class UnauthorizedError(ServeError):
    status_code = 401


class ModelNotFoundError(ServeError):
    status_code = 404


class PayloadTooLargeError(ServeError):
    status_code = 413


class UnsupportedMediaTypeError(ServeError):
    status_code = 415


class ServiceUnavailableError(ServeError):
    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class GatewayTimeoutError(ServeError):
    status_code = 504


class ClientDisconnectedError(ServeError):
    status_code = 499


class BackendError(ServeError):
    status_code = 500


TensorValue = torch.Tensor | np.ndarray
"""A decoded tensor: a torch tensor for numeric datatypes, a numpy object array of ``bytes`` for BYTES."""

# v2 datatype -> (torch dtype, little-endian numpy dtype of the binary form). BF16 travels as raw uint16 bits.
DATATYPES: dict[str, tuple[torch.dtype | None, np.dtype | None]] = {
    "BOOL": (torch.bool, np.dtype("|b1")),
    "UINT8": (torch.uint8, np.dtype("|u1")),
    "UINT16": (torch.uint16, np.dtype("<u2")),
    "UINT32": (torch.uint32, np.dtype("<u4")),
    "UINT64": (torch.uint64, np.dtype("<u8")),
    "INT8": (torch.int8, np.dtype("|i1")),
    "INT16": (torch.int16, np.dtype("<i2")),
    "INT32": (torch.int32, np.dtype("<i4")),
    "INT64": (torch.int64, np.dtype("<i8")),
    "FP16": (torch.float16, np.dtype("<f2")),
    "FP32": (torch.float32, np.dtype("<f4")),
    "FP64": (torch.float64, np.dtype("<f8")),
    "BF16": (torch.bfloat16, np.dtype("<u2")),
    "BYTES": (None, None),
}
_BY_TORCH = {dt: name for name, (dt, _) in DATATYPES.items() if dt is not None}


def datatype_of(value: TensorValue) -> str:
    """The v2 datatype name of a tensor (``"FP32"``, ...); numpy object/bytes arrays are ``"BYTES"``."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _BY_TORCH:
            raise ValueError(f"torch dtype {value.dtype} has no Open Inference Protocol datatype")
        return _BY_TORCH[value.dtype]
    if value.dtype.kind in "OS":
        return "BYTES"
    return _BY_TORCH[torch.from_numpy(np.empty(0, dtype=value.dtype)).dtype]


def rows_of(value: TensorValue) -> int:
    return int(value.shape[0]) if len(value.shape) > 0 else 0


@dataclasses.dataclass(kw_only=True)
class RequestInput:
    name: str
    """Input name."""
    datatype: str
    """Datatype the client declared."""
    shape: list[int]
    """Shape the client declared."""
    value: TensorValue
    """Decoded data, already reshaped to ``shape``."""


@dataclasses.dataclass(kw_only=True)
class RequestedOutput:
    name: str
    """Output name."""
    binary: bool
    """Return this output as binary data (``parameters.binary_data``)."""


@dataclasses.dataclass(kw_only=True)
class InferRequest:
    id: str | None
    """Client request id, echoed in the response."""
    parameters: dict[str, Any]
    """Request-level parameters."""
    inputs: list[RequestInput]
    """Decoded inputs in request order."""
    outputs: list[RequestedOutput] | None
    """Outputs the client asked for; None means all of them."""
    binary_output: bool
    """``parameters.binary_data_output``: default for outputs not named in ``outputs``."""


# ---------------------------------------------------------------------------------------------------------- BYTES
def encode_bytes_elements(items: Iterable[bytes]) -> bytes:
    """BYTES binary form: each element as a 4-byte little-endian length followed by its bytes."""
    parts: list[bytes] = []
    for item in items:
        if isinstance(item, str):
            item = item.encode("utf-8")
        parts.append(struct.pack("<I", len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def decode_bytes_elements(buf: bytes | memoryview, *, name: str = "tensor") -> list[bytes]:
    """Inverse of :func:`encode_bytes_elements`; raises :class:`BadRequestError` on a truncated buffer."""
    view, out, offset = memoryview(buf), [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise BadRequestError(f"BYTES data of {name!r} is truncated: a length prefix at byte {offset} is cut off")
        (n,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + n > len(view):
            raise BadRequestError(f"BYTES data of {name!r} is truncated: element at byte {offset - 4} claims {n} "
                                  f"bytes but only {len(view) - offset} remain")
        out.append(bytes(view[offset:offset + n]))
        offset += n
    return out


def _object_array(items: Sequence[bytes], shape: Sequence[int]) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = list(items)
    return arr.reshape(shape)


# --------------------------------------------------------------------------------------------------------- decode
MAX_RANK = 32
"""Most dimensions a tensor may have (numpy's limit before 2.0); bounds the nesting of ``data`` too."""


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _decode_binary(datatype: str, shape: list[int], buf: memoryview, name: str) -> TensorValue:
    if datatype == "BYTES":
        items = decode_bytes_elements(buf, name=name)
        if len(items) != _numel(shape):
            raise BadRequestError(f"input {name!r} has {len(items)} BYTES elements but shape {shape} needs "
                                  f"{_numel(shape)}")
        return _object_array(items, shape)
    torch_dtype, wire = DATATYPES[datatype]
    assert torch_dtype is not None and wire is not None
    arr = np.frombuffer(buf, dtype=wire).astype(wire.newbyteorder("="), copy=True)
    if datatype == "BOOL" and arr.view(np.uint8).max(initial=0) > 1:
        raise BadRequestError(f"input {name!r} is BOOL but its binary data holds bytes other than 0 and 1")
    tensor = torch.from_numpy(arr).reshape(shape)
    return tensor.view(torch.bfloat16) if datatype == "BF16" else tensor


def _flatten(data: Any, shape: list[int], name: str) -> list[Any]:
    """The row-major values of ``data``: a scalar, a flat list, or lists nested exactly as ``shape`` (a ragged or
    mixed nesting is refused rather than guessed at). Level by level, not recursive: the depth is the client's."""
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data  # flat; a list among the scalars fails the numeric conversion in _decode_json
    level: list[Any] = [data]
    for depth, size in enumerate(shape):
        if not all(isinstance(x, list) and len(x) == size for x in level):
            bad = next(x for x in level if not isinstance(x, list) or len(x) != size)
            got = f"a list of {len(bad)} values" if isinstance(bad, list) else f"the scalar {bad!r}"
            raise BadRequestError(f"input {name!r}: nested 'data' does not match shape {shape}: at depth {depth} "
                                  f"it has {got} where the shape says {size} values; send lists nested exactly as "
                                  "'shape' or one flat row-major list")
        level = list(itertools.chain.from_iterable(level))
    return level  # lists left at the leaves (deeper than shape) show up as extra numpy dimensions in _decode_json


def _decode_json(datatype: str, shape: list[int], data: Any, name: str) -> TensorValue:
    flat = _flatten(data, shape, name)
    if len(flat) != _numel(shape):
        raise BadRequestError(f"input {name!r} has {len(flat)} values but shape {shape} needs {_numel(shape)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise BadRequestError(f"input {name!r} is BYTES: JSON data must be strings (send raw bytes as binary)")
        return _object_array([x.encode("utf-8") for x in flat], shape)
    torch_dtype, wire = DATATYPES[datatype]
    assert torch_dtype is not None and wire is not None
    try:
        arr = np.asarray(flat)
    except ValueError:  # numpy's "inhomogeneous shape": lists among scalars
        raise BadRequestError(f"input {name!r}: 'data' mixes numbers and lists; send lists nested exactly as shape "
                              f"{shape} or one flat row-major list of numbers") from None
    if arr.ndim != 1:
        raise BadRequestError(f"input {name!r}: 'data' is nested deeper than shape {shape} has dimensions")
    kind = arr.dtype.kind if arr.size else "b" if datatype == "BOOL" else "i"
    if datatype == "BOOL":
        if kind not in "biu" or (kind != "b" and not np.isin(arr, (0, 1)).all()):
            raise BadRequestError(f"input {name!r} is BOOL: JSON data must be true/false (or 0/1)")
        arr = arr.astype(bool)
    elif datatype.startswith(("INT", "UINT")):
        if kind in "fO" and all(type(x) is int for x in flat):  # mixed huge ints (UINT64) fall back to float/object
            try:
                arr = np.array(flat, dtype=wire.newbyteorder("="))
            except OverflowError:
                raise BadRequestError(f"input {name!r}: a value is outside the {datatype} range") from None
            kind = "u" if datatype.startswith("U") else "i"
        if kind not in "iu":
            raise BadRequestError(f"input {name!r} is {datatype}: JSON data must be integers")
        info = np.iinfo(wire)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BadRequestError(f"input {name!r}: a value is outside the {datatype} range [{info.min}, {info.max}]")
        arr = arr.astype(wire.newbyteorder("="))
    else:  # FP16/FP32/FP64; BF16 is parsed as float32 and rounded by torch
        if kind not in "iuf":
            raise BadRequestError(f"input {name!r} is {datatype}: JSON data must be numbers")
        with np.errstate(over="ignore"):  # an overflow is refused below, by name
            arr = arr.astype(np.float32 if datatype == "BF16" else wire.newbyteorder("="))
    tensor = torch.from_numpy(arr).reshape(shape)
    if datatype == "BF16":
        tensor = tensor.to(torch.bfloat16)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BadRequestError(f"input {name!r}: a value is NaN, infinite or outside the {datatype} range; JSON "
                              "carries finite numbers only (send non-finite values with the binary extension)")
    return tensor


def _shape_of(raw: Any, name: str) -> list[int]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise BadRequestError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {raw!r}")
    if len(raw) > MAX_RANK:
        raise BadRequestError(f"input {name!r}: 'shape' has {len(raw)} dimensions; at most {MAX_RANK} are supported")
    return list(raw)


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an inference request body (JSON, or JSON + binary tensors when ``header_length`` is given)."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not 0 < header_length <= len(body):
            raise BadRequestError(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} "
                                  "bytes")
        header, binary = body[:header_length], memoryview(body)[header_length:]
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the C scanner stops at the interpreter's recursion limit and unwinds cleanly
        raise BadRequestError("request body is JSON nested too deeply; a v2 request needs a depth of a few levels "
                              "plus one per tensor dimension") from None
    if not isinstance(doc, dict):
        raise BadRequestError("request body must be a JSON object with an 'inputs' list")
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise BadRequestError(f"'id' must be a string, got {type(req_id).__name__}")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequestError("'parameters' must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequestError("request must have a non-empty 'inputs' list")
    inputs: list[RequestInput] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BadRequestError(f"inputs[{i}] must be an object with a string 'name'")
        name = raw["name"]
        if any(x.name == name for x in inputs):
            raise BadRequestError(f"input {name!r} appears more than once")
        datatype = raw.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequestError(f"input {name!r} has unknown datatype {datatype!r}; use one of {sorted(DATATYPES)}")
        shape = _shape_of(raw.get("shape"), name)
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequestError(f"input {name!r}: 'parameters' must be a JSON object")
        if "shared_memory_region" in params:
            raise BadRequestError(f"input {name!r}: shared memory inputs are not supported by this server")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise BadRequestError(f"input {name!r} has both 'data' and parameters.binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequestError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise BadRequestError(f"input {name!r} declares binary_data_size {size} but only "
                                      f"{len(binary) - offset} bytes of binary data remain in the body")
            wire = DATATYPES[datatype][1]
            if wire is not None and size != _numel(shape) * wire.itemsize:
                raise BadRequestError(f"input {name!r} declares binary_data_size {size} but shape {shape} of "
                                      f"{datatype} needs {_numel(shape) * wire.itemsize} bytes")
            value = _decode_binary(datatype, shape, binary[offset:offset + size], name)
            offset += size
        elif "data" in raw:
            value = _decode_json(datatype, shape, raw["data"], name)
        else:
            raise BadRequestError(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        inputs.append(RequestInput(name=name, datatype=datatype, shape=shape, value=value))
    if offset != len(binary):
        raise BadRequestError(f"body holds {len(binary)} bytes of binary tensor data but the inputs' "
                              f"binary_data_size add up to {offset}")
    outputs: list[RequestedOutput] | None = None
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequestError("parameters.binary_data_output must be true or false")
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise BadRequestError("'outputs' must be a list")
        outputs = []
        for i, raw in enumerate(doc["outputs"]):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise BadRequestError(f"outputs[{i}] must be an object with a string 'name'")
            oparams = raw.get("parameters") or {}
            binary_flag = oparams.get("binary_data", binary_output) if isinstance(oparams, dict) else None
            if not isinstance(binary_flag, bool):
                raise BadRequestError(f"output {raw['name']!r}: parameters.binary_data must be true or false")
            outputs.append(RequestedOutput(name=raw["name"], binary=binary_flag))
    return InferRequest(id=req_id, parameters=parameters, inputs=inputs, outputs=outputs, binary_output=binary_output)


# --------------------------------------------------------------------------------------------------------- encode
def _to_binary(value: TensorValue) -> bytes:
    if isinstance(value, np.ndarray):
        return encode_bytes_elements(value.reshape(-1).tolist())
    datatype = datatype_of(value)
    wire = DATATYPES[datatype][1]
    assert wire is not None
    t = value.detach().cpu().contiguous()
    if datatype == "BF16":
        t = t.view(torch.uint16)
    return t.numpy().astype(wire, copy=False).tobytes()


def _to_json(name: str, value: TensorValue) -> list[Any]:
    if isinstance(value, np.ndarray):
        try:
            return [bytes(x).decode("utf-8") for x in value.reshape(-1).tolist()]
        except UnicodeDecodeError:
            raise BadRequestError(f"output {name!r} holds bytes that are not UTF-8; request it with "
                                  "parameters.binary_data=true") from None
    flat = value.detach().cpu().reshape(-1)
    if not flat.is_floating_point() or bool(torch.isfinite(flat).all()):
        return flat.tolist()
    return [x if math.isfinite(x) else None for x in flat.tolist()]  # JSON has no NaN/Infinity (module docstring)


def encode_infer_response(*, model_name: str, model_version: str, request_id: str | None,
                          outputs: Sequence[tuple[str, TensorValue, bool]]) -> tuple[bytes, int | None]:
    """Encode ``(name, value, binary)`` outputs; returns the body and the JSON header length (None: plain JSON)."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value, binary in outputs:
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(value), "shape": list(value.shape)}
        if binary:
            blob = _to_binary(value)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(name, value)
        entries.append(entry)
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
