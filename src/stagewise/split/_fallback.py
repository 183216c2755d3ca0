"""Module-boundary fallback for models that ``torch.export`` cannot capture (e.g. Python branches on tensor values).

The model's module calls are recorded at run time with forward hooks: its direct children, looking inside containers
(``Sequential``/``ModuleList``/``ModuleDict``) and modules that hold one, as the graph capture does. The split applies
only when forward is *verifiably a plain chain*: the model takes one tensor, the first recorded call takes exactly that
tensor, every later call takes exactly the previous call's output (same object, nothing else), forward returns the last
call's output unchanged, and running the calls one after the other reproduces the model's output bit for bit. Then a
stage is a contiguous run of those calls, and a single tensor crosses each cut. Anything else raises
:class:`SplitError` with the capture error, why the fallback does not apply, and what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import StagewiseError
from .._timing import median_ms, num_threads
from ._build import Stage
from ._capture import CaptureError, _should_expand, input_leaves, signature_of
from ._partition import Partition, StageSpec, UnitInfo, ValueSpec
from ._split import SplitError, SplitModel, _partition
from ._tree import TreeSpec, flatten, leaf_names

__all__ = ["ChainCapture", "ChainSplitModel", "record_chain", "split_chain"]

log = logging.getLogger(__name__)


class NotAChain(StagewiseError):
    """The model's forward is not a plain chain of module calls; the message says where it stops being one."""


@dataclasses.dataclass
class ChainCapture:
    """The module calls of one forward pass, verified to form a plain chain (the fallback's counterpart of Capture)."""

    model: nn.Module
    units: list[str]
    """Unit names in call order: module FQNs, ``fqn@k`` for the k-th extra call of the same module."""
    modules: list[str]
    """The module FQN of every unit."""
    out_meta: list[tuple[list[int], torch.dtype]]
    """Shape and dtype of every unit's output except the last (the tensor crossing a cut placed after the unit)."""
    input_names: list[str]
    output_names: list[str]
    out_spec: TreeSpec
    signature: tuple[Any, ...]
    training: bool


def _candidates(module: nn.Module, prefix: str, deep: bool) -> Iterator[str]:
    for name, child in module.named_children():
        fqn = f"{prefix}.{name}" if prefix else name
        if deep and _should_expand(child) and any(True for _ in child.children()):
            yield from _candidates(child, fqn, deep)
        else:
            yield fqn


@contextlib.contextmanager
def _state_kept(model: nn.Module) -> Iterator[None]:
    """Restore buffers (batch-norm statistics) and the RNG after the probing runs."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(saved[name])


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    parts = [type(a).__name__ for a in args] + [f"{k}={type(v).__name__}" for k, v in kwargs.items()]
    return f"({', '.join(parts)})"


def _record(model: nn.Module, x: torch.Tensor, call: Any, deep: bool) -> tuple[list[str], list[str], Any]:
    """Run ``call()`` once with hooks; check the chain property; return (units, module FQNs, output)."""
    fqns = list(_candidates(model, "", deep))
    if not fqns:
        raise NotAChain(f"{type(model).__name__} has no sub-modules to cut between")
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any], Any]] = []
    active: list[str] = []
    handles = []

    def pre(fqn: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not active:  # only the outermost recorded call counts
                calls.append((fqn, args, kwargs, None))
            active.append(fqn)
        return hook

    def post(fqn: str) -> Any:
        def hook(_m: nn.Module, _args: Any, _kwargs: Any, output: Any) -> None:
            active.pop()
            if not active:
                name, a, k, _ = calls[-1]
                calls[-1] = (name, a, k, output)
        return hook

    for fqn in fqns:
        m = model.get_submodule(fqn)
        handles.append(m.register_forward_pre_hook(pre(fqn), with_kwargs=True))
        handles.append(m.register_forward_hook(post(fqn), with_kwargs=True))
    try:
        out = call()
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise NotAChain(f"forward calls none of the sub-modules {fqns[:6]}")
    prev: Any = x
    prev_name = "the model's input"
    for i, (fqn, args, kwargs, output) in enumerate(calls):
        if kwargs or len(args) != 1 or args[0] is not prev:
            raise NotAChain(f"module {fqn!r} is called with {_describe(args, kwargs)}, not with exactly "
                            f"{prev_name} (forward does more than call its blocks one after the other)")
        if i < len(calls) - 1 and not isinstance(output, torch.Tensor):
            raise NotAChain(f"module {fqn!r} returns a {type(output).__name__}; only a single tensor can cross "
                            "a module boundary in the fallback")
        prev, prev_name = output, f"the output of {fqn!r}"
    if out is not prev:
        raise NotAChain(f"forward does not return the output of its last module call {calls[-1][0]!r} unchanged")
    counts: dict[str, int] = {}
    units = []
    for fqn, *_ in calls:
        k = counts.get(fqn, 0)
        counts[fqn] = k + 1
        units.append(f"{fqn}@{k}" if k else fqn)
    return units, [c[0] for c in calls], [c[3] for c in calls]


def record_chain(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> ChainCapture:
    """Record ``model(*args, **kwargs)`` as a chain of module calls and verify it; raises :class:`NotAChain`."""
    leaves, names, _ = input_leaves(args, kwargs)
    single = [*args, *kwargs.values()]
    if len(single) != 1 or len(leaves) != 1 or single[0] is not leaves[0]:
        raise NotAChain(f"forward takes {len(single)} inputs with {len(leaves)} tensors ({', '.join(names)}); the "
                        "fallback needs a single tensor input")
    x = leaves[0]
    reasons = []
    for deep in (True, False):  # look inside block containers first, then only at the direct children
        try:
            with _state_kept(model), torch.no_grad():
                seed = int(torch.randint(0, 2**62, ()).item())
                torch.manual_seed(seed)
                units, fqns, outs = _record(model, x, lambda: model(*args, **kwargs), deep)
                torch.manual_seed(seed)
                ref = model(*args, **kwargs)
                torch.manual_seed(seed)
                y: Any = x
                for fqn in fqns:
                    y = model.get_submodule(fqn)(y)
            a, spec_a = flatten(ref)
            b, spec_b = flatten(y)
            if spec_a != spec_b or any(p.dtype != q.dtype or not torch.equal(p, q) for p, q in zip(a, b)):
                raise NotAChain(f"calling the modules {units[0]}..{units[-1]} one after the other does not reproduce "
                                "the model's output exactly")
            break
        except NotAChain as exc:
            reasons.append(str(exc))
    else:
        raise NotAChain(reasons[0])
    return ChainCapture(model=model, units=units, modules=fqns,
                        out_meta=[(list(t.shape), t.dtype) for t in outs[:-1]], input_names=names,
                        output_names=leaf_names(spec_a), out_spec=spec_a,
                        signature=signature_of(args, kwargs, model.training), training=model.training)


def _unit_state(model: nn.Module, fqn: str) -> list[tuple[str, torch.Tensor]]:
    """(model-level FQN, tensor) of every parameter and buffer of module ``fqn``."""
    m = model.get_submodule(fqn)
    return [(f"{fqn}.{n}", t) for n, t in [*m.named_parameters(), *m.named_buffers()]]


def chain_unit_infos(chain: ChainCapture) -> list[UnitInfo]:
    """Parameters per unit (a weight counts at its first use) and bytes of the tensor a cut after the unit carries."""
    infos = []
    seen: set[int] = set()
    for i, (unit, fqn) in enumerate(zip(chain.units, chain.modules)):
        info = UnitInfo(name=unit)
        for _, t in _unit_state(chain.model, fqn):
            if id(t) in seen:
                continue
            seen.add(id(t))
            info.param_bytes += t.numel() * t.element_size()
            if isinstance(t, nn.Parameter):
                info.params += t.numel()
        if i < len(chain.out_meta):
            shape, dtype = chain.out_meta[i]
            info.out_bytes = torch.Size(shape).numel() * dtype.itemsize
        infos.append(info)
    return infos


def _time_units(chain: ChainCapture, x: torch.Tensor, repeats: int, warmup: int = 1) -> list[tuple[float, float]]:
    """(forward ms, backward ms) of every unit run alone (median of ``repeats`` after ``warmup``)."""
    times: list[tuple[float, float]] = []
    with _state_kept(chain.model):
        for fqn in chain.modules:
            module = chain.model.get_submodule(fqn)
            last: list[Any] = []

            def forward(module: nn.Module = module, x: torch.Tensor = x, last: list[Any] = last) -> Any:
                last[:] = [module(x.detach().requires_grad_(x.is_floating_point()))]
                return last[0]

            times.append(median_ms(forward, _backward, repeats=repeats, warmup=warmup))
            out = last[0]
            x = out.detach() if isinstance(out, torch.Tensor) else x
    for p in chain.model.parameters():
        p.grad = None
    return times


def _backward(out: Any) -> None:
    tensors = [t for t in flatten(out)[0] if t.requires_grad]
    if tensors:
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])


class _ChainStage(nn.Module):
    """Runs a contiguous run of the chain's modules, held at their original FQNs (``blocks.3.lin.weight``)."""

    def __init__(self, model: nn.Module, modules: Sequence[str], returns_outputs: bool) -> None:
        super().__init__()
        self._calls = list(modules)
        self._returns_outputs = returns_outputs
        for fqn in dict.fromkeys(modules):
            owner: nn.Module = self
            *path, leaf = fqn.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.add_module(leaf, model.get_submodule(fqn))

    def forward(self, x: Any) -> tuple[Any, ...]:
        for fqn in self._calls:
            x = self.get_submodule(fqn)(x)
        return tuple(flatten(x)[0]) if self._returns_outputs else (x,)


def build_chain_stages(chain: ChainCapture, starts: Sequence[int]) -> list[Stage]:
    """One :class:`Stage` per contiguous run of units; a weight used by two stages is refused (no tied weights)."""
    bounds = [*starts, len(chain.units)]
    owner: dict[int, tuple[int, str]] = {}
    params: list[list[str]] = [[] for _ in starts]
    for s in range(len(starts)):
        for fqn in dict.fromkeys(chain.modules[bounds[s]:bounds[s + 1]]):
            for name, t in _unit_state(chain.model, fqn):
                if id(t) in owner and owner[id(t)][0] != s:
                    first, first_name = owner[id(t)]
                    raise SplitError(f"weight {first_name!r} (stage {first}) is also used as {name!r} by stage {s}; "
                                     "the module-boundary fallback cannot share a weight between stages. Keep the "
                                     "modules that share it in one stage (cuts=...) or make forward export-friendly.")
                if id(t) not in owner:
                    owner[id(t)] = (s, name)
                    params[s].append(name)
    stages = []
    last = len(starts) - 1
    for s in range(len(starts)):
        lo, hi = bounds[s], bounds[s + 1]

        def crossing(u: int) -> ValueSpec:
            shape, dtype = chain.out_meta[u]
            return ValueSpec(name=chain.units[u], shape=shape, dtype=str(dtype).removeprefix("torch."))

        spec = StageSpec(index=s, units=chain.units[lo:hi], parent=s - 1 if s else None, params=params[s],
                         recv=[crossing(lo - 1)] if s else [], inputs=[] if s else list(chain.input_names),
                         send=[crossing(hi - 1)] if s < last else [],
                         outputs=list(chain.output_names) if s == last else [])
        module = _ChainStage(chain.model, chain.modules[lo:hi], returns_outputs=s == last)
        output_index = list(range(len(chain.output_names))) if s == last else []
        stages.append(Stage(spec, module, output_index))  # type: ignore[arg-type]
    return stages


class ChainSplitModel(SplitModel):
    """A :class:`SplitModel` whose stages run the model's own modules (fallback for models export cannot capture)."""

    def __init__(self, model: nn.Module, partition: Partition, chain: ChainCapture) -> None:
        self.model = model
        self.partition = partition
        stages = build_chain_stages(chain, partition.starts)
        partition.stages = [stage.spec for stage in stages]
        self._captures = {chain.signature: (chain, stages)}  # type: ignore[dict-item]
        self._default = chain.signature

    def stages_for(self, args: Sequence[Any], kwargs: dict[str, Any] | None = None) -> tuple[Any, list[Stage]]:
        kwargs = dict(kwargs or {})
        sig = signature_of(args, kwargs, self.model.training)
        if sig not in self._captures:
            try:
                chain = record_chain(self.model, args, kwargs)
            except NotAChain as exc:
                raise SplitError(f"for these inputs the model is no longer a plain chain of modules: {exc}") from None
            if chain.units != self.partition.unit_names():
                raise SplitError(f"the model's units changed between inputs: {self.partition.unit_names()} vs "
                                 f"{chain.units}")
            self._captures[sig] = (chain, build_chain_stages(chain, self.partition.starts))  # type: ignore[assignment]
        return self._captures[sig]

    def _recut(self, partition: Partition) -> SplitModel:
        partition.capture = "modules"
        chain = self._captures[self._default][0]
        return ChainSplitModel(self.model, partition, chain)  # type: ignore[arg-type]


def split_chain(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], error: CaptureError, *, stages: int,
                by: str, cuts: Sequence[str] | None, repeats: int, profile: bool, threads: int,
                model_name: str | None) -> SplitModel:
    """Split ``model`` at module boundaries after the graph capture failed with ``error``."""
    name = type(model).__name__
    try:
        chain = record_chain(model, args, kwargs)
    except NotAChain as why:
        raise SplitError(
            f"{error}. The module-boundary fallback does not apply either: {why}. To split {name}, make its forward "
            "export-friendly (no Python branches on tensor values such as `if x.sum() > 0:`; use torch.where or "
            "torch.cond), or split by named sub-modules (--submodels) that each capture on their own."
        ) from error
    log.warning("torch.export could not capture %s.forward (%s); splitting it at module boundaries instead "
                "(%d modules called in a plain chain)", name, str(error).partition(": ")[2], len(chain.units))
    units = chain_unit_infos(chain)
    if by == "time" or profile:
        x = input_leaves(args, kwargs)[0][0]
        with num_threads(threads):
            timed = _time_units(chain, x, repeats)
        for info, (fwd, bwd) in zip(units, timed):
            info.forward_ms, info.backward_ms = fwd, bwd
    partition = _partition(name, units, mode="layers", stages=stages, by=by, cuts=cuts, submodels=[], heads=[],
                           model_name=model_name)
    partition.input_names, partition.output_names = list(chain.input_names), list(chain.output_names)
    partition.training, partition.capture = chain.training, "modules"
    return ChainSplitModel(model, partition, chain)
