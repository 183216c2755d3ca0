"""The HTTP front: a FastAPI app speaking the KServe Open Inference Protocol v2 for one or more backends.

Routes (``{v}`` forms accept only the version the backend serves)::

    GET  /v2/health/live   /v2/health/ready          liveness, readiness (200 / 503); never need a token
    GET  /v2                                         server metadata (extensions include binary_tensor_data)
    GET  /v2/models/{name}[/versions/{v}]            model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready      model readiness (200 / 503)
    POST /v2/models/{name}[/versions/{v}]/infer      inference (JSON or binary tensor data extension)
    POST /v2/repository/index                        model repository extension: every model's versions
    POST /v2/repository/models/{name}/load|unload    new weights while serving (see ._repository_routes)
    GET  /metrics                                    Prometheus text exposition of this app's registry
    GET  /v2/openapi.json                            OpenAPI 3.1 document of all of these (see ._openapi)

Every error is ``{"error": "..."}`` with a 4xx/5xx status; nothing a client sends can take the server down.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ._backend import InferenceBackend
from ._infer_route import INFER_PATH, InferRoute, error_response
from ._metrics import GatewayMetrics
from ._openapi import openapi_document
from ._protocol import ServeError, ServiceUnavailableError, UnauthorizedError
from ._registry import Gateway, GatewayConfig
from ._repository_routes import add_repository_routes

__all__ = ["Gateway", "GatewayConfig", "create_app"]

logger = logging.getLogger(__name__)

_HEALTH_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_HEADER_LENGTH = "inference-header-content-length"


def _version() -> str:
    try:
        return importlib.metadata.version("stagewise")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _error(exc: ServeError) -> Response:
    status, body, headers = error_response(exc)
    return Response(body, status_code=status, media_type="application/json",
                    headers={k.decode(): v.decode() for k, v in headers})


class _AuthMiddleware:
    """Pure ASGI bearer-token check (401 with ``WWW-Authenticate``); health routes pass without a token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _HEALTH_PATHS:
            values = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
            scheme, _, token = (values[0] if len(values) == 1 else b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.token):
                msg = "missing bearer token" if not values else "invalid bearer token"
                await _error(UnauthorizedError(f"{msg}: send 'Authorization: Bearer <token>'"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _GatewayApp(FastAPI):
    """FastAPI, except that inference requests skip its middleware and routing for :class:`InferRoute`."""

    infer_route: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and INFER_PATH.fullmatch(scope["path"]):
            await self.infer_route(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(models: InferenceBackend | Sequence[InferenceBackend] | Mapping[str, InferenceBackend], *,
               config: GatewayConfig | None = None, metrics: GatewayMetrics | None = None) -> FastAPI:
    """A FastAPI app serving ``models`` (one backend, a list, or ``name -> backend``; names must be unique)."""
    config = config if config is not None else GatewayConfig()
    if isinstance(models, InferenceBackend):
        models = [models]
    if isinstance(models, Mapping):
        for key, backend in models.items():
            if key != backend.name:
                raise ValueError(f"model key {key!r} differs from the backend's name {backend.name!r}")
        models = list(models.values())
    backends: dict[str, InferenceBackend] = {}
    for backend in models:
        if not isinstance(backend, InferenceBackend):
            raise TypeError(f"models must be InferenceBackend instances, got {type(backend).__name__}")
        if backend.name in backends:
            raise ValueError(f"two backends are named {backend.name!r}; model names must be unique")
        backends[backend.name] = backend
    if not backends:
        raise ValueError("create_app needs at least one model")
    gw = Gateway(backends, config, metrics if metrics is not None else GatewayMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = _GatewayApp(title=config.server_name, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw
    app.infer_route = InferRoute(gw)
    if config.auth_token is not None:
        app.add_middleware(_AuthMiddleware, token=config.auth_token)
        app.infer_route = _AuthMiddleware(app.infer_route, config.auth_token)

    @app.exception_handler(ServeError)
    async def _on_serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{exc.detail}: {request.method} {request.url.path}"},
                            status_code=exc.status_code, headers=exc.headers)

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        if gw.ready():
            return JSONResponse({"ready": True})
        waiting = [n for n, b in gw.backends.items() if not (b.ready() and gw.batchers[n].running)]
        return _error(ServiceUnavailableError(f"models not ready: {waiting}"))

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": config.server_name, "version": _version(),
                "extensions": ["binary_tensor_data", "model_repository"]}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return gw.backend(name, version).metadata().to_json()

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        backend = gw.backend(name, version)
        if backend.ready() and gw.batchers[name].running:
            return JSONResponse({"name": name, "ready": True})
        return _error(ServiceUnavailableError(f"model {name!r} is not ready"))

    @app.get("/v2/openapi.json")  # guarded like model metadata when a token is set: it lists the same models
    async def openapi() -> dict[str, Any]:
        return openapi_document(title=config.server_name, version=_version(), auth=config.auth_token is not None,
                                models={n: b.metadata() for n, b in gw.backends.items()})

    add_repository_routes(app, gw)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        content, media_type = gw.metrics.render()
        return Response(content, media_type=media_type)

    return app

