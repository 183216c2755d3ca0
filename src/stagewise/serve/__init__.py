"""Serving: a KServe Open Inference Protocol v2 HTTP gateway with dynamic batching in front of pluggable backends.

Typical use::

    backend = LocalBackend(model, name="mlp", example_inputs=torch.randn(2, 8), max_batch_size=32)
    app = create_app(backend, config=GatewayConfig(auth_token="secret"))
    server = serve_app(app)          # background thread, free port; server.url, server.stop()
    run(app, host="0.0.0.0", port=8000)  # or: blocking, for the CLI

A new kind of backend (e.g. pipeline stages in other processes) subclasses :class:`InferenceBackend`; it may call
``GatewayMetrics.observe_stage_time`` through the metrics object it receives in ``bind_metrics``.

A split model served by stage-worker processes (``stagewise serve MODEL`` on the command line)::

    backend = PipelineBackend("stagewise.zoo.basic:mlp", stages=2, replicas=2, max_batch_size=32)
    backend.wait_ready()
    run(create_app(backend, config=GatewayConfig(batching=backend.batching_config())))
"""

from ._backend import InferenceBackend, LocalBackend, ModelError, ModelMetadata, TensorMetadata, validate_inputs
from ._batching import BatchingConfig, DynamicBatcher, should_wait
from ._cli import add_infer_parser, add_serve_parser, cmd_infer, cmd_serve
from ._gateway import Gateway, GatewayConfig, create_app
from ._http_guard import HttpLimits
from ._metrics import GatewayMetrics
from ._pipeline import PipelineBackend, PipelineConfig, ReplicaStatus
from ._protocol import (
    DATATYPES,
    BackendError,
    BadRequestError,
    ClientDisconnectedError,
    GatewayTimeoutError,
    InferRequest,
    ModelNotFoundError,
    PayloadTooLargeError,
    RequestedOutput,
    RequestInput,
    ServeError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    datatype_of,
    decode_bytes_elements,
    encode_bytes_elements,
    encode_infer_response,
    parse_infer_request,
)
from ._server import RunningServer, run, serve_app

__all__ = [
    "DATATYPES",
    "BackendError",
    "BadRequestError",
    "BatchingConfig",
    "ClientDisconnectedError",
    "DynamicBatcher",
    "Gateway",
    "GatewayConfig",
    "GatewayMetrics",
    "GatewayTimeoutError",
    "HttpLimits",
    "InferRequest",
    "InferenceBackend",
    "LocalBackend",
    "ModelError",
    "ModelMetadata",
    "ModelNotFoundError",
    "PayloadTooLargeError",
    "PipelineBackend",
    "PipelineConfig",
    "ReplicaStatus",
    "RequestInput",
    "RequestedOutput",
    "RunningServer",
    "ServeError",
    "ServiceUnavailableError",
    "TensorMetadata",
    "UnauthorizedError",
    "UnsupportedMediaTypeError",
    "add_infer_parser",
    "add_serve_parser",
    "cmd_infer",
    "cmd_serve",
    "create_app",
    "datatype_of",
    "decode_bytes_elements",
    "encode_bytes_elements",
    "encode_infer_response",
    "parse_infer_request",
    "run",
    "serve_app",
    "should_wait",
    "validate_inputs",
]
