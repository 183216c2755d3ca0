"""Dynamic batching: requests for one model wait in a bounded queue and leave it concatenated along dim 0.

One loop per model collects pending requests up to ``max_batch_size`` rows, waits at most ``max_delay_ms`` for more
(only when more are likely: another request arrived within the last ``max_delay_ms``, or a batch is already in
flight; a lone request on an idle server is sent at once), and dispatches up to ``max_inflight`` batches to the backend
concurrently (a pipeline backend wants one per stage). Outputs are checked against the backend's contract and split
back per request. Requests cancelled, disconnected or timed out before dispatch are dropped from the queue. When the
model raises on a batch of several requests (:class:`ModelError`), each is run again alone, so only the request that
causes the error gets it (a 400) and its batch-mates get their answers.

A request with more rows than ``max_batch_size`` is rejected with a 400 (it is not split): the limit is a property of
the backend (memory, compiled shapes), and splitting would let one client hold many queue slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch

from .._errors import StagewiseError
from ._backend import InferenceBackend, ModelError, VersionedOutputs
from ._metrics import GatewayMetrics
from ._protocol import (
    BackendError,
    BadRequestError,
    ClientDisconnectedError,
    GatewayTimeoutError,
    ServeError,
    ServiceUnavailableError,
    TensorValue,
    datatype_of,
    rows_of,
)

__all__ = ["BatchingConfig", "Dropped", "DynamicBatcher", "await_or_drop", "should_wait"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class BatchingConfig:
    """How one model's requests are queued and batched."""

    max_batch_size: int | None = None
    """Most rows per dispatched batch; None uses the backend's ``max_batch_size`` (never more than it)."""
    max_delay_ms: float = 2.0
    """Longest time a batch waits for more requests once more are likely (see :func:`should_wait`)."""
    max_queue_size: int = 256
    """Requests that may wait in the queue; one more is answered 503 with ``Retry-After``."""
    max_inflight: int = 1
    """Batches in the backend at once (set it to the number of pipeline stages to keep every stage busy)."""
    timeout_s: float = 30.0
    """Per-request limit from enqueue to answer; past it the client gets a 504."""
    retry_after_s: int = 1
    """``Retry-After`` seconds sent with a 503 when the queue is full."""

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"BatchingConfig.max_batch_size must be >= 1 or None, got {self.max_batch_size}")
        if self.max_delay_ms < 0:
            raise ValueError(f"BatchingConfig.max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.max_queue_size < 1:
            raise ValueError(f"BatchingConfig.max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.max_inflight < 1:
            raise ValueError(f"BatchingConfig.max_inflight must be >= 1, got {self.max_inflight}")
        if self.timeout_s <= 0:
            raise ValueError(f"BatchingConfig.timeout_s must be > 0, got {self.timeout_s}")


def should_wait(*, gap_s: float, inflight: int, max_delay_s: float) -> bool:
    """Whether a batch that is not full should wait for more requests.

    Wait only when more are likely: the request that opened the batch came within ``max_delay_s`` of the one before
    it (traffic is dense), or another batch is in flight (requests are flowing). A lone request is sent at once.
    """
    return max_delay_s > 0 and (gap_s <= max_delay_s or inflight > 0)


class Dropped(StagewiseError):
    """:func:`await_or_drop` cancelled the future: ``reason`` is ``"timeout"`` or ``"cancel"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def await_or_drop(future: asyncio.Future[T], *, timeout_s: float,
                        cancel: asyncio.Future[object] | None = None) -> T:
    """``await future``, cancelling it after ``timeout_s`` or as soon as ``cancel`` completes (then :class:`Dropped`).

    Plain callbacks on the future itself, not ``asyncio.wait``/``wait_for``: no extra task or future per request (on a
    small machine those cost a noticeable share of a request). Cancelling the awaiting task cancels ``future`` too,
    so ``future`` is done whenever this returns or raises.
    """
    why: list[str] = []

    def drop(reason: str) -> None:
        if not future.done():
            why.append(reason)
            future.cancel()

    timer = asyncio.get_running_loop().call_later(timeout_s, drop, "timeout")
    on_cancel = None
    if cancel is not None:
        on_cancel = lambda _: drop("cancel")  # noqa: E731
        cancel.add_done_callback(on_cancel)
    try:
        return await future
    except asyncio.CancelledError:
        if not why:  # the awaiting task itself was cancelled
            raise
        raise Dropped(why[0]) from None
    finally:
        timer.cancel()
        if cancel is not None and on_cancel is not None:
            cancel.remove_done_callback(on_cancel)


@dataclasses.dataclass(eq=False)
class _Pending:
    inputs: dict[str, TensorValue]
    rows: int
    signature: tuple[tuple[str, tuple[int, ...], str], ...]  # requests batch together only when this matches
    future: asyncio.Future[dict[str, TensorValue]]
    deadline: float
    gap_s: float


def _concat(values: Sequence[TensorValue]) -> TensorValue:
    if len(values) == 1:
        return values[0]
    if isinstance(values[0], torch.Tensor):
        return torch.cat(list(values), dim=0)  # type: ignore[arg-type]
    return np.concatenate(values, axis=0)


class DynamicBatcher:
    """The queue and batching loop in front of one backend; :meth:`submit` is what a request handler awaits."""

    def __init__(self, backend: InferenceBackend, config: BatchingConfig | None = None, *,
                 metrics: GatewayMetrics | None = None) -> None:
        self.backend = backend
        self.config = config if config is not None else BatchingConfig()
        limit = self.config.max_batch_size or backend.max_batch_size
        self.max_batch_size = min(limit, backend.max_batch_size)
        self.metrics = metrics
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_arrival = float("-inf")
        self._inflight = 0
        self._closing = False

    @property
    def model(self) -> str:
        return self.backend.name

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self.running:
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_inflight)
        self._loop_task = asyncio.create_task(self._loop(), name=f"stagewise-batcher-{self.model}")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking requests, fail the queued ones with 503, and wait up to ``timeout_s`` for batches in flight."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(ServiceUnavailableError(f"model {self.model!r} is shutting down"))
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
        self._report_depth()

    async def submit(self, inputs: Mapping[str, TensorValue], *, timeout_s: float | None = None,
                     cancel: asyncio.Future[object] | None = None) -> dict[str, TensorValue]:
        """Queue one request and wait for its outputs (``name -> rows of this request``).

        Raises :class:`ServiceUnavailableError` (queue full, stopping), :class:`GatewayTimeoutError`,
        :class:`BadRequestError` (too many rows) or :class:`BackendError`. When ``cancel`` completes first (the client
        went away), the request is dropped and :class:`ClientDisconnectedError` is raised.
        """
        if self._closing or not self.running:
            raise ServiceUnavailableError(f"model {self.model!r} is not accepting requests (batcher not running)")
        values = dict(inputs)
        rows = rows_of(next(iter(values.values())))
        if rows > self.max_batch_size:
            raise BadRequestError(f"request has {rows} rows but model {self.model!r} takes at most "
                                  f"{self.max_batch_size} per request (max_batch_size); split it into smaller requests")
        if len(self._queue) >= self.config.max_queue_size:
            raise ServiceUnavailableError(f"model {self.model!r} queue is full ({self.config.max_queue_size} "
                                          "requests waiting); retry later", retry_after_s=self.config.retry_after_s)
        timeout = min(timeout_s, self.config.timeout_s) if timeout_s is not None else self.config.timeout_s
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        signature = tuple((k, tuple(v.shape[1:]), datatype_of(v)) for k, v in values.items())
        item = _Pending(values, rows, signature, loop.create_future(), now + timeout, now - self._last_arrival)
        self._last_arrival = now
        self._queue.append(item)
        self._report_depth()
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await await_or_drop(item.future, timeout_s=timeout, cancel=cancel)
        except Dropped as exc:
            if exc.reason == "cancel":
                raise ClientDisconnectedError(f"client of model {self.model!r} went away before its answer") from None
            raise GatewayTimeoutError(f"model {self.model!r} did not answer within {timeout:g} s "
                                      f"({self.queue_depth} requests queued)") from None
        finally:  # the future is done however it ended
            if item.future.cancelled():  # timed out, client gone, or this task was cancelled: drop the request
                with contextlib.suppress(ValueError):  # ValueError: already taken into a batch
                    self._queue.remove(item)
                self._report_depth()

    # ------------------------------------------------------------------------------------------------ internals
    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.model, len(self._queue))

    def _pop_live(self) -> _Pending | None:
        """The oldest queued request still worth running; drops cancelled and expired ones."""
        now = time.monotonic()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if now >= item.deadline:  # an exception, not cancel(): a cancelled future reads as the caller cancelled
                item.future.set_exception(GatewayTimeoutError(
                    f"model {self.model!r} did not answer before the request's deadline ({len(self._queue)} requests "
                    "queued)"))
                continue
            return item
        return None

    async def _next(self, timeout: float | None) -> _Pending | None:
        assert self._wakeup is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            item = self._pop_live()
            if item is not None:
                return item
            self._wakeup.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return None

    async def _loop(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()  # a free slot first: while all are busy, requests pile up into one batch
            first = await self._next(None)
            assert first is not None
            batch, rows = [first], first.rows
            max_delay_s = self.config.max_delay_ms / 1000.0
            wait = should_wait(gap_s=first.gap_s, inflight=self._inflight, max_delay_s=max_delay_s)
            close_at = time.monotonic() + (max_delay_s if wait else 0.0)
            while rows < self.max_batch_size:
                item = self._pop_live()
                if item is None and wait and close_at > time.monotonic():
                    item = await self._next(close_at - time.monotonic())
                if item is None:
                    break
                if item.signature != first.signature or rows + item.rows > self.max_batch_size:
                    self._queue.appendleft(item)  # opens the next batch
                    break
                batch.append(item)
                rows += item.rows
            self._report_depth()
            self._inflight += 1
            if self.metrics is not None:
                self.metrics.set_inflight(self.model, self._inflight)
            task = asyncio.create_task(self._dispatch(batch, rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, batch: list[_Pending], rows: int) -> None:
        assert self._slots is not None
        try:
            if self.metrics is not None:
                self.metrics.observe_batch(self.model, rows)
            failed = await self._run(batch, rows)
            if isinstance(failed, ModelError) and len(batch) > 1:  # find the request(s) the model raises on
                for item in batch:
                    if not item.future.done():
                        await self._run([item], item.rows)
        finally:
            self._inflight -= 1
            if self.metrics is not None:
                self.metrics.set_inflight(self.model, self._inflight)
            self._slots.release()

    async def _run(self, batch: list[_Pending], rows: int) -> ModelError | None:
        """One backend call on ``batch``; settles every request of it, except on a :class:`ModelError` of several
        requests, which is returned (the caller isolates)."""
        names = list(batch[0].inputs)
        inputs = {n: _concat([item.inputs[n] for item in batch]) for n in names}
        try:
            answer = await self.backend.infer(inputs)
            outputs = self._check_outputs(answer, rows)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the requests in this batch
            if isinstance(exc, ModelError) and len(batch) > 1:
                return exc
            err = exc if isinstance(exc, ServeError) else BackendError(
                f"model {self.model!r} failed on a batch of {rows} rows: {type(exc).__name__}: {exc}")
            if err is not exc:
                logger.exception("backend %s failed on a batch of %s rows", self.model, rows)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return None
        start = 0
        version = answer.version if isinstance(answer, VersionedOutputs) else None  # one batch, one version
        for item in batch:
            if not item.future.done():
                item.future.set_result(VersionedOutputs({k: v[start:start + item.rows] for k, v in outputs.items()},
                                                        version=version))
            start += item.rows
        return None

    def _check_outputs(self, outputs: Mapping[str, TensorValue], rows: int) -> dict[str, TensorValue]:
        """The backend's contract: every metadata output, as a tensor with ``rows`` rows of the declared datatype."""
        if not isinstance(outputs, Mapping):
            raise BackendError(f"backend {self.model!r} returned {type(outputs).__name__}, expected a dict of outputs")
        checked: dict[str, TensorValue] = {}
        for spec in self.backend.metadata().outputs:
            if spec.name not in outputs:
                raise BackendError(f"backend {self.model!r} returned outputs {sorted(outputs)} without {spec.name!r}")
            value = outputs[spec.name]
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                raise BackendError(f"backend {self.model!r} returned {type(value).__name__} for output {spec.name!r}")
            if rows_of(value) != rows:
                raise BackendError(f"backend {self.model!r} returned {rows_of(value)} rows for {rows} inputs "
                                   f"(output {spec.name!r})")
            if datatype_of(value) != spec.datatype:
                raise BackendError(f"backend {self.model!r} returned {datatype_of(value)} for output {spec.name!r}, "
                                   f"metadata says {spec.datatype}")
            checked[spec.name] = value
        return checked
