"""The generation service's configuration (``stagewise serve --generate`` / :class:`GenerateBackend`), kept apart from
the machinery so the command line can be built from it without importing torch."""

from __future__ import annotations

import dataclasses
from typing import Literal

from .._errors import ConfigError

__all__ = ["GenerateConfig"]


@dataclasses.dataclass(kw_only=True, slots=True)
class GenerateConfig:
    """How a causal language model is split and served for text generation."""

    model: str = dataclasses.field(metadata={"metavar": "MODEL"})
    """A Hugging Face model folder (config.json, weights, tokenizer.json) or a factory 'package.module:factory'."""
    stages: int = 2
    """Pipeline stages (worker processes), each holding a contiguous run of decoder layers and their KV cache."""
    name: str | None = None
    """Model name in the APIs; None: the folder's name or the factory's."""
    tokenizer: str | None = None
    """A tokenizer.json (or a folder holding one); None: the model folder's own."""
    max_seqs: int = 16
    """Sequences generated at once: KV-cache slots preallocated on every stage (unless ``kv_budget_mb`` is set)."""
    kv_budget_mb: float | None = None
    """KV-cache memory per stage (MiB): as many sequences of ``max_len`` tokens as fit on the stage with the most
    layers are generated at once (replaces ``max_seqs``)."""
    max_len: int | None = None
    """Tokens per sequence (prompt + output) each slot holds; None: the model's max_position_embeddings (at most
    4096)."""
    max_queue: int = 64
    """Requests that may wait for a free slot; more are refused with 429 and Retry-After."""
    inflight: int | None = None
    """Decode batches in the pipeline at once; None: one per stage, so no stage waits on the others."""
    max_batch_tokens: int = 2048
    """Most tokens one step carries (prefills are split across steps beyond it)."""
    seed: int = 0
    """torch seed before a factory builds the model (every worker must build the same weights)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight dtype."""
    threads_per_worker: int | None = dataclasses.field(default=None, metadata={"flag": "--threads"})
    """torch threads per worker; None shares the cores evenly."""
    host: str = dataclasses.field(default="127.0.0.1", metadata={"cli": False})
    """Address the worker channel listens on (workers are local processes)."""
    startup_timeout_s: float = dataclasses.field(default=120.0, metadata={"flag": "--startup-timeout"})
    """Longest the workers may take to load the model and allocate their cache."""
    max_restarts: int = 3
    """Times the workers are restarted (sequences prefilled again) without a token generated in between, before
    the service fails its requests."""
    worker_timeout_s: float = dataclasses.field(default=60.0, metadata={"flag": "--worker-timeout"})
    """Longest a step may stay in the pipeline before the workers count as stuck (restarted, sequences re-run)."""
    heartbeat_timeout_s: float = dataclasses.field(default=5.0, metadata={"flag": "--heartbeat-timeout"})
    """A worker silent this long (workers beat every second from a thread of their own) is stopped or hung: the
    workers are restarted and the sequences re-run."""

    def __post_init__(self) -> None:
        for field in ("stages", "max_seqs", "max_batch_tokens"):
            if getattr(self, field) < 1:
                raise ConfigError(f"GenerateConfig.{field} must be >= 1, got {getattr(self, field)!r}")
        if self.kv_budget_mb is not None and not self.kv_budget_mb > 0:
            raise ConfigError(f"GenerateConfig.kv_budget_mb must be > 0 or None, got {self.kv_budget_mb!r}")
        if self.max_restarts < 0:
            raise ConfigError(f"GenerateConfig.max_restarts must be >= 0, got {self.max_restarts!r}")
        if self.max_queue < 0:
            raise ConfigError(f"GenerateConfig.max_queue must be >= 0, got {self.max_queue!r}")
        for field in ("max_len", "inflight", "threads_per_worker"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ConfigError(f"GenerateConfig.{field} must be >= 1 or None, got {value!r}")
