"""``POST /v2/models/{name}[/versions/{v}]/infer`` as a raw ASGI handler, in front of the FastAPI app.

The inference route is the only hot one, and FastAPI's per-request machinery (middleware stack, routing, ``Request``
objects, dependency solving, response classes) costs more CPU than everything else a request does here: on a small
machine ~1 ms of a ~1.5 ms echo. So the gateway app hands inference requests to this handler, straight on ASGI
messages, and every other request to FastAPI (metadata, health, metrics: cold routes where FastAPI's conveniences are
worth their cost).

It does exactly what the route did: body limits (by ``Content-Length``, while reading, after inflating gzip/deflate),
the Content-Type (JSON, the binary extension's octet-stream or none; 415 otherwise), v2 JSON and binary parsing,
validation against the model's metadata, the batcher with the client's own timeout and disconnect, the v2 response,
``{"error": ...}`` answers with the protocol's status codes, and request metrics. """

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zlib
from collections.abc import Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

from ._backend import VersionedOutputs, validate_inputs
from ._protocol import (
    BadRequestError,
    ClientDisconnectedError,
    PayloadTooLargeError,
    ServeError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    encode_infer_response,
    parse_infer_request,
)
from ._registry import Gateway

__all__ = ["INFER_PATH", "InferRoute", "error_response"]

logger = logging.getLogger(__name__)

INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")
_JSON = b"application/json"


def error_response(exc: ServeError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, ``{"error": ...}`` body and extra headers of an error answer."""
    headers: list[tuple[bytes, bytes]] = []
    if isinstance(exc, ServiceUnavailableError):
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    if isinstance(exc, UnauthorizedError):
        headers.append((b"www-authenticate", b'Bearer realm="stagewise"'))
    return exc.status_code, json.dumps({"error": str(exc)}).encode(), headers


async def _respond(send: Send, status: int, body: bytes, content_type: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, headers: Mapping[bytes, bytes], limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before or while reading, and after inflating."""
    length = headers.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            raise BadRequestError(f"invalid Content-Length {length.decode('latin-1')!r}")
        if int(length) > limit:
            raise PayloadTooLargeError(f"request body of {int(length)} bytes exceeds the limit of {limit} bytes "
                                       "(GatewayConfig.max_payload_bytes)")
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError("the client went away while sending its request")
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes "
                                       "(GatewayConfig.max_payload_bytes)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise BadRequestError(f"cannot {encoding}-decompress the request body: {exc}") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise PayloadTooLargeError(f"decompressed request body exceeds the limit of {limit} bytes "
                                       "(GatewayConfig.max_payload_bytes)")
    elif encoding != "identity":
        raise BadRequestError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    return body


def _check_content_type(headers: Mapping[bytes, bytes]) -> None:
    """Refuse (415) a body that declares itself as something else than JSON or the binary extension's bytes.

    No Content-Type is accepted (tritonclient sends none); ``text/plain`` or curl's default form encoding are not: the
    body would be read as JSON anyway, so saying so is the honest answer and tells the client what to change.
    """
    raw = headers.get(b"content-type")
    if raw is None:
        return
    media = raw.split(b";", 1)[0].strip().lower()
    if media in (b"application/json", b"application/octet-stream") or media.endswith(b"+json"):
        return
    raise UnsupportedMediaTypeError(f"Content-Type {raw.decode('latin-1')!r} is not supported on the inference route; "
                                    "send application/json (curl: -H 'Content-Type: application/json'), or "
                                    "application/octet-stream with Inference-Header-Content-Length for binary tensors")


def _header_length(headers: Mapping[bytes, bytes]) -> int | None:
    raw = headers.get(b"inference-header-content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise BadRequestError("Inference-Header-Content-Length must be a non-negative integer, got "
                              f"{raw.decode('latin-1')!r}")
    return int(raw)


def _timeout_s(parameters: Mapping[str, Any]) -> float | None:
    """The request's own ``parameters.timeout`` (microseconds, as Triton clients send it), if any."""
    raw = parameters.get("timeout")
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw <= 0:
        raise BadRequestError(f"parameters.timeout must be a positive integer (microseconds), got {raw!r}")
    return raw / 1e6


async def _disconnected(receive: Receive) -> None:
    """Completes when the client goes away (the server answers ``receive()`` with http.disconnect after the body)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class InferRoute:
    """The ASGI app of the inference paths (:data:`INFER_PATH`); anything it raises becomes an ``{"error"}`` answer."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = INFER_PATH.fullmatch(scope["path"])
        assert match is not None, scope["path"]
        name, version = match["name"], match["version"]
        if scope["method"] != "POST":
            await _respond(send, 405, json.dumps({"error": f"method {scope['method']} not allowed on "
                                                           f"{scope['path']}; use POST"}).encode(), _JSON,
                           [(b"allow", b"POST")])
            return
        start, status, reason = time.perf_counter(), 500, "internal"
        try:
            status = await self._infer(scope, receive, send, name, version)
            reason = ""
        except ClientDisconnectedError:
            status, reason = 499, "ClientDisconnected"  # nobody to answer
        except ServeError as exc:
            status, reason = exc.status_code, type(exc).__name__.removesuffix("Error")
            code, body, headers = error_response(exc)
            await _respond(send, code, body, _JSON, headers)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request a 500, not the server
            logger.exception("inference request for model %s failed", name)
            body = json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"}).encode()
            await _respond(send, 500, body, _JSON)
        finally:
            label = name if name in self.gw.backends else "_unknown"  # bounded label set: never echo arbitrary names
            self.gw.metrics.observe_request(label, status, time.perf_counter() - start, reason or None)

    async def _infer(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> int:
        gw = self.gw
        backend = gw.backend(name, version)
        if not backend.ready():
            raise ServiceUnavailableError(f"model {name!r} is not ready; retry later")
        meta = backend.metadata()
        headers = dict(scope["headers"])
        _check_content_type(headers)
        body = await _read_body(receive, headers, gw.config.max_payload_bytes)
        req = parse_infer_request(body, _header_length(headers))
        inputs = validate_inputs(req, meta)
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            outputs = await gw.batchers[name].submit(inputs, timeout_s=_timeout_s(req.parameters), cancel=watcher)
        finally:
            watcher.cancel()
        if req.outputs is not None:  # only the outputs asked for, in the order asked
            selected = [(o.name, outputs[o.name], o.binary) for o in req.outputs]
        else:
            selected = [(t.name, outputs[t.name], req.binary_output) for t in meta.outputs]
        computed = outputs.version if isinstance(outputs, VersionedOutputs) else None  # the weights that ran it
        content, header_length = encode_infer_response(model_name=name,
                                                       model_version=computed or version or meta.versions[0],
                                                       request_id=req.id, outputs=selected)
        if header_length is None:
            await _respond(send, 200, content, _JSON)
        else:
            await _respond(send, 200, content, b"application/octet-stream",
                           [(b"inference-header-content-length", str(header_length).encode())])
        return 200

