"""The planner's profile of a model: every unit timed at several microbatch sizes, plus the loss and the data loading.

A unit's time is not proportional to its rows: each call pays a fixed cost (Python, dispatch, kernel launches) that a
1-row microbatch pays as much as a 32-row one. So :func:`profile_chain` times the chain at a few row counts and the cost
model interpolates piecewise linearly between them (:meth:`ChainProfile.unit_ms`), extrapolating from the nearest two.
It also times what the stage profile leaves out but a training step pays: the loss (forward and backward, on the last
stage) and loading a batch from the data set (on the ranks that read inputs or targets). The optimizer step is timed in
fresh processes (:func:`stagewise.launch.time_optimizer`, over :attr:`ChainProfile.param_shapes`) and added with
:meth:`ChainProfile.with_optimizer`; :func:`stagewise.launch.profile_model` does both.

The whole model is never needed at once: a model built on the meta device (:func:`stagewise.split.params_on_meta`,
as ``stagewise plan`` builds it) is timed unit by unit with one unit's weights materialised at a time
(:func:`stagewise.split.time_units`), the loss is timed on the outputs of that chain, and parameter bytes and shapes
come from the meta tensors. Only a model ``torch.export`` cannot capture is given all its weights, since the
module-boundary fallback has to run it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from .._allocator import tune_allocator
from .._optimizers import OPTIMIZERS
from .._spec import ModelSpec, sample_to_call, training_data
from .._timing import median_ms, num_threads
from ..split import SavedBytes, UnitInfo, input_leaves, materialise, split, time_units, unflatten

__all__ = ["ChainProfile", "interpolate", "profile_chain", "profile_rows"]

log = logging.getLogger(__name__)


def interpolate(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    """``ys`` at ``x``, piecewise linear over the ascending ``xs``, extrapolated from the nearest two points, never
    negative; one point: proportional (``ys[0] * x / xs[0]``)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need as many values as points, got {len(xs)} points and {len(ys)} values")
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = 1
    while i < len(xs) - 1 and xs[i] < x:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclasses.dataclass(kw_only=True)
class ChainProfile:
    """A profiled chain of units at several microbatch sizes; the cost model's view of one model."""

    units: list[UnitInfo]
    """The units with their times at the largest profiled row count (``rows[-1]``), parameters and activation bytes."""
    rows: list[int]
    """Row counts the chain was timed at, ascending."""
    forward_ms: list[list[float]]
    """``forward_ms[i][u]``: forward milliseconds of unit ``u`` at ``rows[i]`` rows."""
    backward_ms: list[list[float]]
    """``backward_ms[i][u]``: backward milliseconds of unit ``u`` at ``rows[i]`` rows."""
    loss_forward_ms: list[float] = dataclasses.field(default_factory=list)
    """Loss forward milliseconds at each of ``rows`` (empty: no loss was timed; counts as 0)."""
    loss_backward_ms: list[float] = dataclasses.field(default_factory=list)
    """Loss backward milliseconds at each of ``rows`` (empty: none)."""
    load_rows: list[int] = dataclasses.field(default_factory=list)
    """Batch sizes the data loading was timed at, ascending (empty: not timed; counts as 0)."""
    load_ms: list[float] = dataclasses.field(default_factory=list)
    """Milliseconds to read and collate a batch of ``load_rows[i]`` samples from the data set."""
    optimizer: str | None = None
    """The optimizer ``optimizer_ms`` was timed with (None: not timed)."""
    optimizer_ms: list[float] = dataclasses.field(default_factory=list)
    """Milliseconds of one optimizer step (and ``zero_grad``) over each unit's parameters, state in main memory
    (empty: not timed)."""
    saved_bytes: list[int] = dataclasses.field(default_factory=list)
    """Bytes each unit's forward saves for backward at the largest profiled row count, the loss's counted in the last
    unit (:class:`stagewise.split.SavedBytes`): the activations a stage holds per microbatch in training (empty: not
    measured, e.g. the module-boundary fallback; :attr:`UnitInfo.out_bytes` then stand in)."""
    param_shapes: list[list[list[int]]] | None = None
    """``param_shapes[u]``: the shapes of unit ``u``'s trainable parameters, what the optimizer timing needs (None:
    the chain is not a layer split, whose units own their parameters)."""

    def __post_init__(self) -> None:
        if not self.units:
            raise ValueError("ChainProfile.units must not be empty")
        if not self.rows or any(r < 1 for r in self.rows) or sorted(set(self.rows)) != list(self.rows):
            raise ValueError(f"ChainProfile.rows must be distinct ints >= 1 in ascending order, got {self.rows}")
        for name in ("forward_ms", "backward_ms"):
            table = getattr(self, name)
            if len(table) != len(self.rows) or any(len(t) != len(self.units) for t in table):
                raise ValueError(f"ChainProfile.{name} needs one list per row count ({len(self.rows)}), each with "
                                 f"one entry per unit ({len(self.units)})")
        for name in ("loss_forward_ms", "loss_backward_ms"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.rows):
                raise ValueError(f"ChainProfile.{name} needs one entry per row count ({len(self.rows)}) or none")
        if len(self.load_rows) != len(self.load_ms):
            raise ValueError("ChainProfile.load_rows and load_ms need the same length")
        if self.optimizer_ms and len(self.optimizer_ms) != len(self.units):
            raise ValueError(f"ChainProfile.optimizer_ms needs one entry per unit ({len(self.units)}) or none")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"ChainProfile.optimizer must be one of {OPTIMIZERS} or None, got {self.optimizer!r}")
        if self.saved_bytes and len(self.saved_bytes) != len(self.units):
            raise ValueError(f"ChainProfile.saved_bytes needs one entry per unit ({len(self.units)}) or none")
        if self.param_shapes is not None and len(self.param_shapes) != len(self.units):
            raise ValueError(f"ChainProfile.param_shapes needs one entry per unit ({len(self.units)}) or None")

    def with_optimizer(self, optimizer: str, optimizer_ms: Sequence[float]) -> ChainProfile:
        """This profile with the ``optimizer`` step timed at ``optimizer_ms`` per unit (measured elsewhere)."""
        return dataclasses.replace(self, optimizer=optimizer, optimizer_ms=[float(x) for x in optimizer_ms])

    @property
    def profile_batch(self) -> int:
        """The largest profiled row count: the rows ``units``' times are at."""
        return self.rows[-1]

    @classmethod
    def from_units(cls, units: Sequence[UnitInfo], *, profile_batch: int) -> ChainProfile:
        """A one-point profile: times proportional to rows, no loss, no loading (the plain-units cost model)."""
        return cls(units=list(units), rows=[profile_batch], forward_ms=[[u.forward_ms for u in units]],
                   backward_ms=[[u.backward_ms for u in units]])

    def unit_ms(self, rows: int) -> tuple[list[float], list[float]]:
        """(forward, backward) milliseconds of every unit at ``rows`` rows; the loss is added to the last unit."""
        n = len(self.units)
        fwd = [interpolate(self.rows, [t[u] for t in self.forward_ms], rows) for u in range(n)]
        bwd = [interpolate(self.rows, [t[u] for t in self.backward_ms], rows) for u in range(n)]
        if self.loss_forward_ms:
            fwd[-1] += interpolate(self.rows, self.loss_forward_ms, rows)
        if self.loss_backward_ms:
            bwd[-1] += interpolate(self.rows, self.loss_backward_ms, rows)
        return fwd, bwd

    def load_seconds(self, rows: int) -> float:
        """Seconds to load a batch of ``rows`` samples (0 when not timed)."""
        return interpolate(self.load_rows, self.load_ms, rows) / 1e3 if self.load_rows else 0.0


def _rows_of(value: Any, rows: int) -> Any:
    """The first ``rows`` rows of every tensor (dim 0 is the batch), tiled when the example has fewer."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        reps = -(-rows // value.shape[0])
        return (value.repeat(reps, *[1] * (value.dim() - 1)) if reps > 1 else value)[:rows]
    if isinstance(value, dict):
        return {k: _rows_of(v, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_rows_of(v, rows) for v in value)
    return value


def _loss_ms(spec: ModelSpec, output: Any, targets: tuple[Any, ...], repeats: int) -> tuple[float, float, int]:
    """(forward, backward) milliseconds of ``spec.loss`` on the model's ``output`` (fresh leaves), and the bytes its
    forward saves for backward."""
    assert spec.loss is not None
    loss_fn = spec.loss
    leaves, tree = torch.utils._pytree.tree_flatten(output)
    fresh = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in leaves]
    output = torch.utils._pytree.tree_unflatten(fresh, tree)
    fwd, bwd = median_ms(lambda: loss_fn(output, *targets), lambda loss: loss.backward(), repeats=repeats)
    meter = SavedBytes(())
    with meter.counting():
        kept = loss_fn(output, *targets)
    saved = meter.live
    del kept
    return fwd, bwd, saved


@dataclasses.dataclass
class _AtRows:
    """One timing of the chain at one row count."""

    units: list[UnitInfo]
    forward: list[float]
    backward: list[float]
    loss: tuple[float, float, int] | None
    load: float | None
    split: Any
    saved: list[int]
    """Bytes each unit saves for backward (the loss's added to the last unit); empty: not measured."""

    def faster(self, other: _AtRows) -> _AtRows:
        """Each time the smaller of the two (other processes on the machine only ever add time)."""
        def low(a: list[float], b: list[float]) -> list[float]:
            return [min(x, y) for x, y in zip(a, b)]

        loss = None if self.loss is None or other.loss is None else (min(self.loss[0], other.loss[0]),
                                                                      min(self.loss[1], other.loss[1]), self.loss[2])
        load = None if self.load is None or other.load is None else min(self.load, other.load)
        return _AtRows(units=self.units, forward=low(self.forward, other.forward),
                       backward=low(self.backward, other.backward), loss=loss, load=load, split=self.split,
                       saved=self.saved)


def _time_at(spec: ModelSpec, data: Any, rows: int, repeats: int, threads: int, model_name: str | None) -> _AtRows:
    collate = torch.utils.data.default_collate
    targets: tuple[Any, ...] = ()
    load = None
    if data is not None:
        inputs, targets = collate([data[i] for i in range(rows)])
        args, kwargs = sample_to_call(inputs)
        load = median_ms(lambda: collate([data[i] for i in range(rows)]), repeats=repeats)[0]
    else:
        args, kwargs = _rows_of(spec.args, rows), _rows_of(spec.kwargs, rows)
    was_training = spec.model.training
    name = model_name or spec.name
    try:
        sm = split(spec.model, args, kwargs, stages=1, model_name=name)
    except RuntimeError:
        if not _materialise_whole(spec.model):
            raise
        sm = split(spec.model, args, kwargs, stages=1, model_name=name)
    saved: list[int] = []
    if sm.partition.capture == "modules":
        # The module-boundary fallback records the model running, so it holds real weights: its profiler times them.
        sm = split(spec.model, args, kwargs, stages=1, by="time", profile=True, repeats=repeats, threads=threads,
                   model_name=name)
        output = _whole_output(spec, args, kwargs) if spec.loss is not None and data is not None else None
    else:
        # Unit by unit; a model on the meta device gets one unit's weights at a time (split.time_units).
        cap, _ = sm.stages_for(args, kwargs)
        leaves, names, _ = input_leaves(args, kwargs)
        timed = time_units(cap, dict(zip(names, leaves)), repeats=repeats)
        for info, (fwd, bwd) in zip(sm.partition.units, timed.times):
            info.forward_ms, info.backward_ms = fwd, bwd
        output = unflatten(cap.out_spec, timed.outputs)
        saved = list(timed.saved_bytes)
    spec.model.train(was_training)
    units = sm.partition.units
    loss = None
    if spec.loss is not None and data is not None:
        loss = _loss_ms(spec, output, tuple(targets), repeats)
        if saved:
            saved[-1] += loss[2]
    log.debug("profiled %d units at %d rows: %.3f ms forward, %.3f ms backward", len(units), rows,
              sum(u.forward_ms for u in units), sum(u.backward_ms for u in units))
    return _AtRows(units=units, forward=[u.forward_ms for u in units], backward=[u.backward_ms for u in units],
                   loss=loss, load=load, split=sm, saved=saved)


def _materialise_whole(model: torch.nn.Module) -> bool:
    """Give a meta model all its weights (seeded); False if it had none on meta. Only for a model torch.export cannot
    capture: the module-boundary fallback records it running, which meta weights cannot do."""
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        log.info("%s cannot be captured as a graph; profiling it with all its weights", type(model).__name__)
        materialise(model, on_meta)
    return bool(on_meta)


def _whole_output(spec: ModelSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return spec.model(*args, **kwargs)


def profile_rows(largest: int) -> list[int]:
    """The microbatch sizes to profile up to ``largest``: 1, ``largest`` and two powers of two evenly spaced between
    them on a log scale (the cost model interpolates between these)."""
    if largest < 1:
        raise ValueError(f"the largest profiled batch must be >= 1, got {largest}")
    inner = {2 ** round(math.log2(largest) * k / 3) for k in (1, 2)}
    return sorted({1, largest} | {r for r in inner if 1 < r < largest})


def profile_chain(spec: ModelSpec, *, rows: Sequence[int], repeats: int = 5, rounds: int = 1, threads: int = 1,
                  model_name: str | None = None) -> ChainProfile:
    """Time every unit of ``spec``'s chain at each microbatch size in ``rows`` (the chain is captured again per size;
    inputs come from the data set when there is one, else the example inputs cut or tiled to that many rows), with
    ``threads`` compute threads (what each training process uses), plus the loss and the data loading, in this
    process; record each unit's parameter shapes for the optimizer timing (:func:`stagewise.launch.profile_model`
    adds it).

    Each time is the median of ``repeats`` runs after a warm-up; with ``rounds`` > 1 every row count is timed again
    after the others and each time keeps its smallest median (a burst of load from other processes rarely hits every
    round).
    """
    tune_allocator()  # time what training workers run: freed blocks stay mapped between steps
    wanted = sorted({int(r) for r in rows})
    if not wanted or wanted[0] < 1:
        raise ValueError(f"rows must be row counts >= 1, got {list(rows)}")
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1, got {repeats} and {rounds}")
    data = training_data(spec) if spec.dataset is not None else None
    if data is not None and len(data) < wanted[-1]:
        raise ValueError(f"the data set has {len(data)} samples, fewer than the {wanted[-1]} rows to profile; "
                         "profile fewer rows")
    shapes = None
    with num_threads(threads):
        timed = [_time_at(spec, data, r, repeats, threads, model_name) for r in wanted]
        for _ in range(rounds - 1):
            timed = [t.faster(_time_at(spec, data, r, repeats, threads, model_name)) for t, r in zip(timed, wanted)]
        if len({len(t.units) for t in timed}) != 1:
            raise ValueError(f"the chain has a different number of units at different row counts ({wanted}); "
                             "profile a single row count")
        units, sm = timed[-1].units, timed[-1].split
        if sm.partition.mode == "layers":
            per_unit = sm.recut(stages=len(units), by="uniform") if len(units) > 1 else sm
            shapes = [[list(p.shape) for p in stage.parameters() if p.requires_grad] for stage in per_unit.stages]
    losses = [t.loss for t in timed]
    loads = [t.load for t in timed]
    has_loss = all(x is not None for x in losses)
    has_load = all(x is not None for x in loads)
    return ChainProfile(units=units, rows=wanted, forward_ms=[t.forward for t in timed],
                        backward_ms=[t.backward for t in timed],
                        loss_forward_ms=[x[0] for x in losses] if has_loss else [],  # type: ignore[index]
                        loss_backward_ms=[x[1] for x in losses] if has_loss else [],  # type: ignore[index]
                        load_rows=wanted if has_load else [], load_ms=loads if has_load else [],  # type: ignore
                        param_shapes=shapes, saved_bytes=timed[-1].saved)
