"""HTTP APIs of a generation service: OpenAI-compatible completions and chat, and KServe's generate extension.

- ``GET /v1/models``; ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` answers server-sent
  events, one chunk per token, ending in ``data: [DONE]``); errors as OpenAI's ``{"error": {message, type, code}}``.
- ``POST /v2/models/{model}/generate`` (``{"text_input", "parameters"}`` -> ``{"model_name", "text_output"}``) and
  ``/generate_stream`` (one event per token); errors as ``{"error": message}``.
- ``GET /v2/health/live``, ``/v2/health/ready``; ``GET /v1/stats`` (KV-cache use, queue, tokens/s, time to first token,
  inter-token latency) and the same at ``GET /metrics`` for Prometheus.

A client that disconnects from a stream closes the backend's token iterator: the sequence leaves the batch and its
KV slot is free at once on every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ._gen_backend import GenerateBackend, TokenEvent
from ._gen_sampling import SamplingError, SamplingParams
from ._protocol import ClientDisconnectedError, ServeError, ServiceUnavailableError

__all__ = ["create_generate_app", "sampling_from"]

_DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks that its client is still there."""
_METRICS = [
    ("kv_cache_use", "gauge", "Fraction of the KV-cache slots in use."),
    ("slots_used", "gauge", "KV-cache slots (sequences) in use."),
    ("waiting", "gauge", "Requests waiting for a slot."),
    ("steps_inflight", "gauge", "Steps in the pipeline."),
    ("tokens", "counter", "Tokens generated."),
    ("tokens_per_s", "gauge", "Tokens generated per second since start."),
    ("ttft_p50_ms", "gauge", "Median time to first token of the last 1000 requests (ms)."),
    ("itl_p50_ms", "gauge", "Median inter-token latency of the last 10000 tokens (ms)."),
    ("restarts", "counter", "Restarts of the stage workers."),
]
_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


def sampling_from(body: dict[str, Any], *, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from a request body (OpenAI names; ``max_new_tokens`` and ``stop_token_ids`` also taken)."""
    fields = dict(defaults or {})
    for key in ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos"):
        if body.get(key) is not None:
            fields[key] = body[key]
    if body.get("max_new_tokens") is not None:
        fields["max_tokens"] = body["max_new_tokens"]
    if body.get("max_completion_tokens") is not None:
        fields["max_tokens"] = body["max_completion_tokens"]
    if body.get("n", 1) != 1:
        raise SamplingError("only n=1 is served")
    try:
        return SamplingParams(**fields)
    except TypeError as exc:
        raise SamplingError(f"bad sampling parameter: {exc}") from None


def _status(exc: BaseException) -> int:
    if isinstance(exc, ServeError):
        return exc.status_code
    return 400 if isinstance(exc, (ValueError, TypeError, FileNotFoundError)) else 500


def _headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ServiceUnavailableError):
        return {"Retry-After": str(exc.retry_after_s)}
    return {}


def _openai_error(exc: BaseException) -> JSONResponse:
    status = _status(exc)
    body = {"error": {"message": str(exc), "type": _OPENAI_TYPES.get(status, "server_error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=_headers(exc))


def _kserve_error(exc: BaseException) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=_status(exc), headers=_headers(exc))


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise SamplingError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise SamplingError("the request body must be a JSON object")
    return body


def _sse(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


async def _first(events: AsyncIterator[TokenEvent]) -> tuple[TokenEvent | None, AsyncIterator[TokenEvent]]:
    """Start the generation before answering, so refusals (429, 400) are HTTP errors, not broken streams."""
    try:
        return await events.__anext__(), events
    except StopAsyncIteration:
        return None, events


def create_generate_app(backend: GenerateBackend, *, auth_token: str | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` (see the module doc)."""
    app = FastAPI(title=f"stagewise generate: {backend.name}")
    name = backend.name

    if auth_token is not None:
        @app.middleware("http")
        async def _auth(request: Request, call_next: Any) -> Response:
            if request.url.path.startswith("/v2/health"):
                return await call_next(request)
            if request.headers.get("authorization") != f"Bearer {auth_token}":
                return JSONResponse({"error": {"message": "missing or wrong bearer token", "type": "auth_error",
                                               "code": 401}}, status_code=401)
            return await call_next(request)

    def check_model(model: Any) -> None:
        if model not in (None, name):
            from ._protocol import ModelNotFoundError

            raise ModelNotFoundError(f"model {model!r} is not served here; this server serves {name!r}")

    def prompt_ids(prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return backend.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise SamplingError("prompt must be a string or a list of token ids (one prompt per request)")

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if backend.ready() else 503)

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return backend.stats()

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: the stats as gauges (and the token count as a counter)."""
        stats = backend.stats()
        lines = []
        for key, kind, what in _METRICS:
            value = stats.get(key)
            if value is None:
                continue
            metric = f"stagewise_generate_{key}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {metric} {what}", f"# TYPE {metric} {kind}",
                      f'{metric}{{model="{name}"}} {float(value):.6g}']
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "stagewise"}]}

    async def run(ids: list[int], params: SamplingParams, request: Request) -> tuple[str, str | None, int]:
        """The whole output; a client that disconnects meanwhile cancels the sequence (its slot is freed)."""
        text: list[str] = []
        reason: str | None = None
        n = 0

        async def consume() -> None:
            nonlocal reason, n
            async with contextlib.aclosing(backend.generate(ids, params)) as events:
                async for ev in events:
                    text.append(ev.text)
                    n += ev.token is not None
                    reason = ev.finish_reason

        task = asyncio.ensure_future(consume())
        while not (await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ClientDisconnectedError("the client went away")
        task.result()
        return "".join(text), reason, n

    async def stream(ids: list[int], params: SamplingParams, chunk: Any, *, done: bool = True) -> Response:
        first, events = await _first(backend.generate(ids, params))

        async def body() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(events):
                pending = first
                index = 0
                while pending is not None:
                    yield _sse(chunk(pending, index))
                    index += 1
                    if pending.finish_reason is not None:
                        break
                    try:
                        pending = await events.__anext__()
                    except StopAsyncIteration:
                        break
            if done:  # OpenAI's end marker; KServe's stream just ends
                yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = await _json(request)
            check_model(body.get("model"))
            ids, params = prompt_ids(body.get("prompt")), sampling_from(body)
            cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

            def chunk(ev: TokenEvent, _index: int) -> dict[str, Any]:
                return {"id": cid, "object": "text_completion", "created": created, "model": name,
                        "choices": [{"index": 0, "text": ev.text, "logprobs": None,
                                     "finish_reason": ev.finish_reason}]}

            if body.get("stream"):
                return await stream(ids, params, chunk)
            text, reason, n = await run(ids, params, request)
        except Exception as exc:  # noqa: BLE001 - every error answers in OpenAI's shape
            return _openai_error(exc)
        return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": name,
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                       "total_tokens": len(ids) + n}})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = await _json(request)
            check_model(body.get("model"))
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise SamplingError("messages must be a non-empty list of {role, content} objects")
            ids = backend.encode(backend.chat.render(messages))
            params = sampling_from(body)
            cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

            def chunk(ev: TokenEvent, index: int) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ev.text} if index == 0 else {"content": ev.text}
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                     "finish_reason": ev.finish_reason}]}

            if body.get("stream"):
                return await stream(ids, params, chunk)
            text, reason, n = await run(ids, params, request)
        except Exception as exc:  # noqa: BLE001 - every error answers in OpenAI's shape
            return _openai_error(exc)
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": name,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": reason}],
                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                       "total_tokens": len(ids) + n}})

    async def kserve(model: str, request: Request, streaming: bool) -> Response:
        try:
            check_model(model)
            body = await _json(request)
            text_input = body.get("text_input")
            if not isinstance(text_input, str):
                raise SamplingError("text_input must be a string")
            parameters = body.get("parameters") or {}
            if not isinstance(parameters, dict):
                raise SamplingError("parameters must be an object")
            ids, params = backend.encode(text_input), sampling_from(parameters)

            def chunk(ev: TokenEvent, _index: int) -> dict[str, Any]:
                doc: dict[str, Any] = {"model_name": name, "model_version": "1", "text_output": ev.text}
                if ev.finish_reason is not None:
                    doc["finish_reason"] = ev.finish_reason
                return doc

            if streaming:
                return await stream(ids, params, chunk, done=False)
            text, reason, _ = await run(ids, params, request)
        except Exception as exc:  # noqa: BLE001 - every error answers in the extension's shape
            return _kserve_error(exc)
        return JSONResponse({"model_name": name, "model_version": "1", "text_output": text, "finish_reason": reason})

    @app.post("/v2/models/{model}/generate")
    async def generate(model: str, request: Request) -> Response:
        return await kserve(model, request, False)

    @app.post("/v2/models/{model}/generate_stream")
    async def generate_stream(model: str, request: Request) -> Response:
        return await kserve(model, request, True)

    return app
