"""Prometheus metrics of one gateway, kept in a registry of its own (never the process-global one).

A per-app registry lets several gateways live in one process (tests, sub-model servers) without clashing names.
Labelled children are looked up once per label set and kept: ``labels()`` costs ~10 us, and a request touches
metrics several times.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class GatewayMetrics:
    """Counters, gauges and histograms of a gateway; ``render()`` gives the ``/metrics`` text exposition."""

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "stagewise") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        ns, reg = namespace, self.registry
        self.requests = Counter("requests", "Inference requests by model and HTTP status.",
                                ["model", "status"], namespace=ns, registry=reg)
        self.errors = Counter("errors", "Failed inference requests by model and reason.",
                              ["model", "reason"], namespace=ns, registry=reg)
        self.latency = Histogram("request_latency_seconds", "Inference request latency, body read to response.",
                                 ["model"], namespace=ns, registry=reg, buckets=_LATENCY_BUCKETS)
        self.batch_size = Histogram("batch_size", "Rows per batch dispatched to a backend.",
                                    ["model"], namespace=ns, registry=reg, buckets=_BATCH_BUCKETS)
        self.queue_depth = Gauge("queue_depth", "Requests waiting in a model's batching queue.",
                                 ["model"], namespace=ns, registry=reg)
        self.inflight = Gauge("inflight_batches", "Batches dispatched to a backend and not yet answered.",
                              ["model"], namespace=ns, registry=reg)
        self.replica_ready = Gauge("replica_ready", "1 while a pipeline replica serves, 0 while it is down.",
                                   ["model", "replica"], namespace=ns, registry=reg)
        self.replica_restarts = Counter("replica_restarts", "Pipeline replica restarts after a failure.",
                                        ["model", "replica"], namespace=ns, registry=reg)
        self.stage_time = Histogram("stage_seconds", "Time one batch spends in one pipeline stage.",
                                    ["model", "stage"], namespace=ns, registry=reg, buckets=_LATENCY_BUCKETS)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, model: str, status: int, seconds: float, reason: str | None = None) -> None:
        """Record one finished inference request (``reason`` names the failure class when status >= 400)."""
        self._child(self.requests, model, str(status)).inc()
        self._child(self.latency, model).observe(seconds)
        if status >= 400:
            self._child(self.errors, model, reason or str(status)).inc()

    def observe_batch(self, model: str, rows: int) -> None:
        self._child(self.batch_size, model).observe(rows)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self._child(self.queue_depth, model).set(depth)

    def set_inflight(self, model: str, batches: int) -> None:
        self._child(self.inflight, model).set(batches)

    def observe_stage_time(self, model: str, stage: str, seconds: float) -> None:
        """Record the time one batch spent in pipeline stage ``stage`` (called by pipeline backends)."""
        self._child(self.stage_time, model, str(stage)).observe(seconds)

    def set_replica_ready(self, model: str, replica: int, ready: bool) -> None:
        """Record whether replica ``replica`` of ``model`` serves (called by pipeline backends)."""
        self._child(self.replica_ready, model, str(replica)).set(1 if ready else 0)

    def count_restart(self, model: str, replica: int) -> None:
        """Count one restart of replica ``replica`` of ``model``; the child exists from the first call on."""
        self._child(self.replica_restarts, model, str(replica)).inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
