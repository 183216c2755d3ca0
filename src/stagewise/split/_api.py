"""``split()``: capture a model, measure its units, place the cuts, and build runnable stages.

Two ways to capture: the whole forward as one graph (:mod:`._split`), or, when ``torch.export`` cannot, the chain of
modules it calls (:mod:`._fallback`); both end in a :class:`SplitModel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .._spec import ModelSpec
from .._timing import num_threads
from ._capture import CaptureError, capture, input_leaves
from ._fallback import split_chain
from ._partition import COST_METHODS
from ._profile import profile_units
from ._split import _CAPTURE_HINT, SplitError, SplitModel, _layout, _partition, unit_infos

__all__ = ["split"]


def split(model: nn.Module | ModelSpec, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, *,
          stages: int = 2, by: str = "params", cuts: Sequence[str] | None = None,
          submodels: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
          repeats: int = 3, profile: bool = False, threads: int = 1, model_name: str | None = None) -> SplitModel:
    """Cut ``model`` into stages that together compute exactly ``model(*args, **kwargs)``.

    - Layer split (default): the chain of units is cut into ``stages`` contiguous stages minimising the most expensive
      stage under the cost ``by`` (``uniform``, ``params`` or measured ``time``), or at the units named in ``cuts``
      (each names the first unit of a stage after the first, or a module holding units: the cut goes before its first
      unit; one string is one cut or a comma-separated list).
    - ``submodels=["encoder", "decoder"]``: each named sub-module becomes one stage.
    - ``tasks=["heads.cls", "heads.reg"]``: the trunk is cut into ``stages`` stages, then one stage per head.

    ``profile=True`` measures every unit's forward/backward time even when the cost is not ``time`` (the median of
    ``repeats`` runs, with ``threads`` compute threads: 1, like each training rank by default).
    """
    if isinstance(model, ModelSpec):
        spec = model
        model, args, kwargs = spec.model, spec.args, spec.kwargs
        model_name = model_name or spec.name
    kwargs = dict(kwargs or {})
    if by not in COST_METHODS:
        raise SplitError(f"unknown cost {by!r}; use one of {', '.join(COST_METHODS)}")
    if submodels and tasks:
        raise SplitError("give either submodels or tasks, not both")
    atomic = list(submodels or tasks or [])
    for fqn in atomic:
        try:
            model.get_submodule(fqn)
        except AttributeError:
            names = [n for n, _ in model.named_children()]
            raise SplitError(f"{type(model).__name__} has no sub-module {fqn!r}; its children are {names}") from None
    try:
        cap = capture(model, args, kwargs, atomic=atomic)
    except CaptureError as exc:
        if atomic:
            raise SplitError(f"{exc}. {_CAPTURE_HINT.format(name=type(model).__name__)}") from exc
        # The module-boundary fallback, for plain chains of blocks.
        return split_chain(model, args, kwargs, exc, stages=stages, by=by, cuts=cuts, repeats=repeats,
                           profile=profile, threads=threads, model_name=model_name)
    units = unit_infos(cap)
    if by == "time" or profile:
        leaves, names, _ = input_leaves(args, kwargs)
        with num_threads(threads):
            timed = profile_units(cap, dict(zip(names, leaves)), repeats=repeats)
        for info, (fwd, bwd) in zip(units, timed):
            info.forward_ms, info.backward_ms = fwd, bwd
    mode = "submodels" if submodels else "tasks" if tasks else "layers"
    partition = _partition(type(model).__name__, units, mode=mode, stages=stages, by=by, cuts=cuts,
                           submodels=list(submodels or []), heads=list(tasks or []), model_name=model_name)
    partition.input_names, partition.output_names, partition.training = cap.input_names, cap.output_names, \
        cap.training
    return SplitModel(model, partition, cap, _layout(cap, partition))
