"""A split model: the cuts placed over the captured units, and the runnable stages built from them
(:class:`SplitModel`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from .._errors import StagewiseError
from ._balance import cuts_from_names, min_max_cuts
from ._build import Stage, _Layout, build_stage, plan_stages, value_bytes
from ._capture import Capture, CaptureError, capture, input_leaves, signature_of
from ._meta import materialise, release, tensor_aliases
from ._pack import StagePack, strip_weights
from ._partition import COST_METHODS, Partition, UnitInfo
from ._run import run_stages
from ._tree import flatten, unflatten

__all__ = ["ReadWeights", "SplitError", "SplitModel", "unit_infos"]

ReadWeights = Callable[[Mapping[str, torch.Tensor], Mapping[str, list[str]]], Mapping[str, torch.Tensor]]
"""Reads a stage's weights: (FQN -> expected meta tensor, FQN -> its other names) -> FQN -> tensor."""

log = logging.getLogger(__name__)


class SplitError(StagewiseError, ValueError):
    """The model cannot be split as asked; the message says why and what to change."""


_CAPTURE_HINT = ("Stagewise needs to capture {name}.forward as a graph to split it. Make sure the example inputs are "
                 "valid for the model (model(*args, **kwargs) runs), avoid Python branches on tensor values in "
                 "forward, or split by named sub-modules (--submodels) that each capture on their own.")


def _cut_units(chain: Sequence[str], cuts: Sequence[str] | str) -> list[str]:
    """The unit each cut names. A string is one cut or a comma-separated list (``"a.b"`` is not four cuts); a module
    that holds units rather than being one (``encoder.stages.2``, a container of blocks) means "before its first
    unit"."""
    names = [c.strip() for c in cuts.split(",") if c.strip()] if isinstance(cuts, str) else list(cuts)
    out = []
    for name in names:
        if name not in chain:
            name = next((u for u in chain if u.startswith(f"{name}.")), name)
        out.append(name)
    return out


def _partition(model_type: str, units: list[UnitInfo], *, mode: str, stages: int, by: str,
               cuts: Sequence[str] | str | None, submodels: list[str], heads: list[str],
               model_name: str | None) -> Partition:
    """Place the cuts over ``units`` (sub-model starts, named cuts, or the exact min-max cut under cost ``by``)."""
    names = [u.name for u in units]
    if mode == "submodels":
        starts = _submodel_starts(names, submodels)
    else:
        chain = names if mode == "layers" else names[: _first_head_unit(names, heads)]
        if cuts:
            try:
                starts = cuts_from_names(chain, _cut_units(chain, cuts))
            except ValueError as exc:
                raise SplitError(str(exc)) from None
        else:
            if stages < 1:
                raise SplitError(f"stages must be at least 1, got {stages}")
            if stages > len(chain):
                raise SplitError(f"{model_type} has {len(chain)} units ({', '.join(chain[:8])}"
                                 f"{'...' if len(chain) > 8 else ''}); it cannot be cut into {stages} stages. "
                                 f"Use --stages {len(chain)} or fewer.")
            starts = min_max_cuts(_costs(units[: len(chain)], by), stages)
    return Partition(mode=mode, by="cuts" if cuts else by, units=units, starts=starts, stages=[], heads=heads,
                     submodels=submodels, model=model_name)


def _capture(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], *, atomic: Sequence[str]) -> Capture:
    try:
        return capture(model, args, kwargs, atomic=atomic)
    except CaptureError as exc:
        raise SplitError(f"{exc}. {_CAPTURE_HINT.format(name=type(model).__name__)}") from exc


def _costs(units: Sequence[UnitInfo], by: str) -> list[float]:
    if by == "uniform":
        return [1.0] * len(units)
    if by == "params":
        return [float(u.params) for u in units]
    return [u.forward_ms + u.backward_ms for u in units]


def _submodel_starts(names: list[str], submodels: list[str]) -> list[int]:
    starts = []
    for fqn in submodels:
        hits = [i for i, n in enumerate(names) if n == fqn or n.startswith(fqn + "@")]
        if not hits:
            raise SplitError(f"sub-module {fqn!r} is never called by forward for these inputs; units are {names}")
        starts.append(hits[0])
    if starts != sorted(starts):
        raise SplitError(f"sub-models must be listed in execution order; forward calls them as "
                         f"{[submodels[i] for i in sorted(range(len(starts)), key=starts.__getitem__)]}")
    starts[0] = 0
    return starts


def _first_head_unit(names: list[str], heads: list[str]) -> int:
    idx = [i for i, n in enumerate(names) if n.split("@")[0] in heads]
    if len(idx) != len(heads):
        missing = [h for h in heads if h not in {n.split("@")[0] for n in names}]
        raise SplitError(f"task heads {missing} are never called by forward; units are {names}")
    first = min(idx)
    if first == 0:
        raise SplitError("a task split needs a shared trunk before the heads")
    return first


def _layout(cap: Capture, partition: Partition) -> _Layout:
    names = cap.units
    expected = partition.unit_names()
    if names != expected:
        raise SplitError(f"the model's units changed between captures: {expected} vs {names}")
    nodes_by_unit: list[list[fx.Node]] = [[] for _ in names]
    for node in cap.compute_nodes():
        nodes_by_unit[cap.node_unit[node]].append(node)
    chain_end = len(names)
    head_units: dict[int, str] = {}
    if partition.mode == "tasks":
        for i, n in enumerate(names):
            if n.split("@")[0] in partition.heads:
                head_units[i] = n.split("@")[0]
        chain_end = min(head_units)
    bounds = [*partition.starts, chain_end]
    layout = _Layout(nodes=[], parents=[], units=[], heads=[])
    for s in range(len(partition.starts)):
        lo, hi = bounds[s], bounds[s + 1]
        layout.nodes.append([n for u in range(lo, hi) for n in nodes_by_unit[u]])
        layout.units.append(names[lo:hi])
        layout.parents.append(s - 1 if s else None)
        layout.heads.append(None)
    if head_units:
        trunk_last = len(layout.nodes) - 1
        head_stage: dict[str, int] = {}
        for u in range(chain_end, len(names)):
            head = head_units.get(u) or _head_of_glue(cap, nodes_by_unit[u], layout, head_stage)
            if head not in head_stage:
                head_stage[head] = len(layout.nodes)
                layout.nodes.append([])
                layout.units.append([])
                layout.parents.append(trunk_last)
                layout.heads.append(head)
            s = head_stage[head]
            layout.nodes[s].extend(nodes_by_unit[u])
            layout.units[s].append(names[u])
    return layout


def _head_of_glue(cap: Capture, nodes: list[fx.Node], layout: _Layout, head_stage: dict[str, int]) -> str:
    """Units after the heads belong to the one head they read from; reading from two heads cannot be a tree."""
    reads = set()
    for node in nodes:
        for arg in node.all_input_nodes:
            for head, s in head_stage.items():
                if arg in layout.nodes[s]:
                    reads.add(head)
    if len(reads) != 1:
        raise SplitError(f"forward combines the task heads {sorted(reads)} after running them; a task split needs "
                         "each head's outputs to be computed by that head alone (combine them in the loss instead)")
    return reads.pop()


def unit_infos(cap: Capture) -> list[UnitInfo]:
    """Parameters per unit (a weight counts at its first use) and bytes crossing a cut after each unit."""
    infos = [UnitInfo(name=n) for n in cap.units]
    seen: set[fx.Node] = set()
    topo = {n: i for i, n in enumerate(cap.graph.nodes)}
    params = {fqn for fqn, _ in cap.model.named_parameters(remove_duplicate=False)}
    for node in cap.compute_nodes():
        u = cap.node_unit[node]
        for arg in node.all_input_nodes:
            if arg in cap.state_nodes and arg not in seen:
                seen.add(arg)
                nbytes = value_bytes(arg, cap)
                infos[u].param_bytes += nbytes
                if cap.state_nodes[arg] in params:
                    infos[u].params += cap.model.get_parameter(cap.state_nodes[arg]).numel()
    # Liveness: a value defined in unit a and last used in unit b crosses every cut a..b-1.
    last_use: dict[fx.Node, int] = {}
    first_def: dict[fx.Node, int] = {}
    for node in sorted(cap.compute_nodes(), key=topo.__getitem__):
        u = cap.node_unit[node]
        first_def.setdefault(node, u)
        for arg in node.all_input_nodes:
            if arg in cap.node_unit or arg in cap.state_nodes:
                last_use[arg] = max(last_use.get(arg, u), u)
                if arg in cap.state_nodes:
                    first_def[arg] = min(first_def.get(arg, u), u)
    n_units = len(infos)
    for node in cap.output_nodes:
        if node is not None:
            last_use[node] = n_units  # model outputs travel to the end
    delta = [0] * (n_units + 1)
    for node, end in last_use.items():
        start = first_def.get(node)
        if start is None or end <= start:
            continue
        b = value_bytes(node, cap)
        delta[start] += b
        delta[min(end, n_units - 1)] -= b
    running = 0
    for u in range(n_units - 1):
        running += delta[u]
        infos[u].out_bytes = running
    return infos


class SplitModel:
    """A model cut into stages. Call it like the model; ``stages`` are runnable on their own."""

    def __init__(self, model: nn.Module, partition: Partition, cap: Capture, layout: _Layout) -> None:
        self.model = model
        self.partition = partition
        stages = self._build(cap, layout)
        partition.stages = [stage.spec for stage in stages]
        self._captures: dict[Any, tuple[Capture, list[Stage]]] = {cap.signature: (cap, stages)}
        self._default = cap.signature

    def _build(self, cap: Capture, layout: _Layout) -> list[Stage]:
        specs = plan_stages(cap, layout)
        return [build_stage(cap, spec, nodes) for spec, nodes in zip(specs, layout.nodes)]

    @property
    def stages(self) -> list[Stage]:
        """Stages built for the example inputs."""
        return self._captures[self._default][1]

    def stages_for(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> tuple[Capture, list[Stage]]:
        """Stages for another input signature (shapes, dtypes, train/eval); captured once and cached."""
        kwargs = dict(kwargs or {})
        sig = signature_of(args, kwargs, self.model.training)
        if sig not in self._captures:
            atomic = self.partition.submodels or self.partition.heads
            cap = _capture(self.model, args, kwargs, atomic=atomic)
            self._captures[sig] = (cap, self._build(cap, _layout(cap, self.partition)))
        return self._captures[sig]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(args, kwargs)

    def materialise(self, indices: Iterable[int], *, read: ReadWeights | None = None, seed: int = 0,
                    dtype: torch.dtype | None = None) -> None:
        """Give the parameters of stages ``indices`` real storage (a model built with :func:`params_on_meta`): read by
        ``read(wanted, aliases)`` (FQN -> meta tensor, FQN -> other names; returns FQN -> tensor), else the seeded
        layout-independent initialisation. Only these stages' weights are ever allocated; every cached capture's
        stages are rebuilt on the new weights."""
        owned = [fqn for s in indices for fqn in self.partition.stages[s].params]
        values = None
        if read is not None:
            model_params = dict(self.model.named_parameters())
            wanted = {fqn: model_params[fqn] for fqn in owned if fqn in model_params and model_params[fqn].is_meta}
            aliases = tensor_aliases(self.model)
            values = read(wanted, {fqn: aliases.get(fqn, []) for fqn in wanted}) if wanted else {}
        materialise(self.model, owned, values=values, seed=seed, dtype=dtype)
        self._rebuild()

    def pack(self, indices: Iterable[int], args: Sequence[Any] | None = None,
             kwargs: dict[str, Any] | None = None) -> StagePack:
        """Stages ``indices`` as data for another process (see :class:`StagePack`): built for the example inputs, or
        for ``(args, kwargs)``, with every parameter on the meta device; this split's own stages keep theirs."""
        cap = self._captures[self._default][0] if args is None else self.stages_for(args, kwargs)[0]
        layout = _layout(cap, self.partition)
        specs = plan_stages(cap, layout)
        stages = {i: build_stage(cap, specs[i], layout.nodes[i]) for i in indices}
        strip_weights(stages)
        return StagePack(partition=self.partition, stages=stages, out_spec=cap.out_spec,
                         output_names=list(cap.output_names))

    def keep_only(self, indices: Iterable[int]) -> None:
        """Drop the weights of every stage but ``indices`` (they move to the meta device): what a process that built
        the whole model keeps once it knows its stages."""
        release(self.model, {fqn for s in indices for fqn in self.partition.stages[s].params})
        self._rebuild()

    def param_bytes(self, indices: Iterable[int]) -> int:
        """Bytes of the parameters stages ``indices`` own (what a process running them must hold)."""
        params = dict(self.model.named_parameters())
        return sum(params[f].nbytes for s in indices for f in self.partition.stages[s].params if f in params)

    def _rebuild(self) -> None:
        for sig, (cap, _) in list(self._captures.items()):
            self._captures[sig] = (cap, self._build(cap, _layout(cap, self.partition)))

    def recut(self, *, stages: int | None = None, by: str | None = None,
              cuts: Sequence[str] | None = None) -> SplitModel:
        """The same captured model cut again (no new capture): into ``stages`` stages under cost ``by``, or at ``cuts``.

        ``stages`` defaults to the current number of chain stages, ``by`` to the current cost (``params`` after a
        split at named cuts). A sub-model split has one stage per sub-model and cannot be re-cut.
        """
        p = self.partition
        if p.mode == "submodels":
            raise SplitError("a sub-model split has one stage per sub-model; call split() with other submodels")
        by = by or (p.by if p.by != "cuts" else "params")
        if by not in COST_METHODS:
            raise SplitError(f"unknown cost {by!r}; use one of {', '.join(COST_METHODS)}")
        if by == "time" and not any(u.forward_ms or u.backward_ms for u in p.units):
            raise SplitError("the units were not timed; split with profile=True (or by='time') to recut by time")
        new = _partition(type(self.model).__name__, [dataclasses.replace(u) for u in p.units], mode=p.mode,
                         stages=len(p.starts) if stages is None else stages, by=by, cuts=cuts,
                         submodels=list(p.submodels), heads=list(p.heads), model_name=p.model)
        new.input_names, new.output_names, new.training = list(p.input_names), list(p.output_names), p.training
        return self._recut(new)

    def _recut(self, partition: Partition) -> SplitModel:
        cap = self._captures[self._default][0]
        return SplitModel(self.model, partition, cap, _layout(cap, partition))

    def run(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None, *, head: str | None = None) -> Any:
        """Run the stages one after the other in this process (all heads, or the trunk plus ``head``)."""
        cap, stages = self.stages_for(args, kwargs)
        leaves, names, _ = input_leaves(args, dict(kwargs or {}))
        inputs = dict(zip(names, leaves))
        if head is not None and head not in self.partition.heads:
            raise ValueError(f"unknown task head {head!r}; heads are {self.partition.heads}")
        wanted = [stage for stage in stages if head is None or stage.spec.head in (None, head)]
        outputs = run_stages(wanted, inputs, outputs=len(cap.output_names))
        result = unflatten(cap.out_spec, outputs)
        if head is not None and isinstance(result, dict) and type(result) is dict:
            result = {k: v for k, v in result.items() if v is not None}
        return result

    def __repr__(self) -> str:
        return f"SplitModel({type(self.model).__name__}, {self.partition.num_stages} stages)"


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensor leaves of a model output, for comparisons and losses."""
    return flatten(out)[0]
