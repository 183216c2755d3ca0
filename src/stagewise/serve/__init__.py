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

New weights while it serves (every answer names its ``model_version``): ``backend.load(checkpoint=DIR)``, or over
HTTP the model repository extension, ``POST /v2/repository/models/NAME/load`` (see ``_live_update``).
"""

from .._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "add_generate_parsers": "._gen_cli",
    "add_infer_parser": "._cli",
    "add_serve_parser": "._cli",
    "add_worker_parser": "._cli",
    "BackendError": "._protocol",
    "BadRequestError": "._protocol",
    "BatchingConfig": "._batching",
    "ClientDisconnectedError": "._protocol",
    "cmd_infer": "._cli",
    "cmd_serve": "._cli",
    "create_app": "._gateway",
    "create_generate_app": "._gen_routes",
    "datatype_of": "._protocol",
    "DATATYPES": "._protocol",
    "decode_bytes_elements": "._protocol",
    "DynamicBatcher": "._batching",
    "encode_bytes_elements": "._protocol",
    "encode_infer_response": "._protocol",
    "Gateway": "._gateway",
    "GenerateBackend": "._gen_backend",
    "GenerateConfig": "._gen_config",
    "GatewayConfig": "._gateway",
    "GatewayMetrics": "._metrics",
    "GatewayTimeoutError": "._protocol",
    "HttpLimits": "._http_guard",
    "InferenceBackend": "._backend",
    "InferRequest": "._protocol",
    "LocalBackend": "._backend",
    "ModelError": "._backend",
    "ModelMetadata": "._backend",
    "ModelNotFoundError": "._protocol",
    "parse_infer_request": "._protocol",
    "PayloadTooLargeError": "._protocol",
    "PipelineBackend": "._pipeline",
    "PipelineConfig": "._config",
    "ReplicaStatus": "._pipeline",
    "RequestedOutput": "._protocol",
    "RequestInput": "._protocol",
    "run": "._server",
    "RunningServer": "._server",
    "serve_app": "._server",
    "ServeError": "._protocol",
    "ServiceUnavailableError": "._protocol",
    "should_wait": "._batching",
    "TensorMetadata": "._backend",
    "UnauthorizedError": "._protocol",
    "UnsupportedMediaTypeError": "._protocol",
    "validate_inputs": "._backend",
    "VersionedOutputs": "._backend",
})
