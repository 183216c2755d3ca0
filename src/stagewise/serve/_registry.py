"""The models, their batchers and the metrics behind one gateway app, and its settings.

Its own module so that the app (:mod:`._gateway`) and the inference route (:mod:`._infer_route`) both build on it
without importing each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping

from ._backend import InferenceBackend
from ._batching import BatchingConfig, DynamicBatcher
from ._metrics import GatewayMetrics
from ._protocol import ModelNotFoundError

__all__ = ["Gateway", "GatewayConfig"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class GatewayConfig:
    """Settings of one gateway app."""

    server_name: str = "stagewise"
    """``name`` reported by ``GET /v2``."""
    max_payload_bytes: int = 64 * 1024 * 1024
    """Largest request body (after decompression); larger ones get 413."""
    auth_token: str | None = None
    """When set, every route except ``/v2/health/*`` needs ``Authorization: Bearer <token>``."""
    batching: BatchingConfig = dataclasses.field(default_factory=BatchingConfig)
    """Batching settings of every model without an entry in ``model_batching``."""
    model_batching: dict[str, BatchingConfig] = dataclasses.field(default_factory=dict)
    """Per-model batching overrides, by model name."""
    stop_timeout_s: float = 5.0
    """How long shutdown waits for batches in flight."""
    close_backends: bool = True
    """Call each backend's ``close()`` when the app shuts down."""

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 1:
            raise ValueError(f"GatewayConfig.max_payload_bytes must be >= 1, got {self.max_payload_bytes}")
        if self.auth_token is not None and (not self.auth_token or any(c.isspace() for c in self.auth_token)):
            raise ValueError("GatewayConfig.auth_token must be a non-empty string without whitespace, or None")
        if self.stop_timeout_s < 0:
            raise ValueError(f"GatewayConfig.stop_timeout_s must be >= 0, got {self.stop_timeout_s}")


class Gateway:
    """The models, their batchers and the metrics behind one app (``app.state.gateway``)."""

    def __init__(self, backends: Mapping[str, InferenceBackend], config: GatewayConfig,
                 metrics: GatewayMetrics) -> None:
        self.config, self.metrics, self.backends = config, metrics, dict(backends)
        unknown = sorted(set(config.model_batching) - set(self.backends))
        if unknown:
            raise ValueError(f"GatewayConfig.model_batching names unknown models {unknown}; models: "
                             f"{sorted(self.backends)}")
        self.batchers = {name: DynamicBatcher(b, config.model_batching.get(name, config.batching), metrics=metrics)
                         for name, b in self.backends.items()}
        for b in self.backends.values():
            b.bind_metrics(metrics)

    def backend(self, name: str, version: str | None) -> InferenceBackend:
        backend = self.backends.get(name)
        if backend is None:
            raise ModelNotFoundError(f"unknown model {name!r}; this server has {sorted(self.backends)}")
        versions = backend.metadata().versions
        if version is not None and version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; it serves {list(versions)}")
        return backend

    def ready(self) -> bool:
        return all(b.ready() and self.batchers[n].running for n, b in self.backends.items())

    async def start(self) -> None:
        for batcher in self.batchers.values():
            await batcher.start()

    async def stop(self) -> None:
        await asyncio.gather(*(b.stop(self.config.stop_timeout_s) for b in self.batchers.values()))
        if self.config.close_backends:
            for backend in self.backends.values():
                try:
                    await backend.close()
                except Exception:  # noqa: BLE001 - one failing close must not keep the others open
                    logger.exception("closing backend %s failed", backend.name)
