"""Build nothing you do not own: a model whose parameters live on the meta device, captured with stand-in weights,
and then materialised stage by stage (from weights files, or by a layout-independent seeded initialisation).

Why parameters only: buffers are usually computed in ``__init__`` (rotary ``inv_freq``, causal masks, position ids)
and must hold their true values; they are small. A meta *buffer* left uninitialised after ``to_empty`` is the classic
silent bug of this technique, so buffers are built for real.

Why the capture swaps in fake CPU parameters: ``torch.export`` fakeifies every tensor anyway, but a meta parameter
would make it record ``device=meta`` literals (``arange(..., device=x.device)``) and mix devices; fake CPU tensors
give exactly the graph that real weights give.

The seeded initialisation (:func:`materialise`, no values given) makes every parameter a function of ``(seed, the
FQN of the module that owns it)`` only: each module is initialised once, alone, with the global RNG seeded from its
name, by its ``reset_parameters`` and, for Hugging Face models, the model's own ``_init_weights``. Any layout
(stages x replicas) therefore starts from the weights a single process starts from, and nobody builds the whole model.
A module with neither (a custom ``nn.Parameter(torch.zeros(d))``) keeps the value the factory gave it at construction.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["cast_meta_params", "has_meta_params", "held_param_bytes", "materialise", "params_on_meta", "release",
           "stand_in_params", "tensor_aliases"]

_INIT_VALUES = "_stagewise_init_values"
"""Attribute of a module holding the construction-time values of its parameters (modules without reset_parameters)."""


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Within this block, every parameter a module registers moves to the meta device (buffers stay real).

    A parameter of a module without ``reset_parameters`` keeps its construction value aside (it is small in practice:
    norms' ones, a class token), because no initialiser could make it again.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is None or param.device.type == "meta":
            return
        if not hasattr(self, "reset_parameters"):
            values = self.__dict__.setdefault(_INIT_VALUES, {})
            values[name] = param.detach().clone()
        self._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def cast_meta_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every floating meta parameter ``dtype`` (nothing is allocated; ties stay tied). Buffers keep theirs, as
    Hugging Face's ``torch_dtype`` does (rotary frequencies stay float32)."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta" or not param.dtype.is_floating_point:
                continue
            if id(param) not in cast:
                cast[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device="meta"),
                                               requires_grad=param.requires_grad)
            module._parameters[name] = cast[id(param)]


def has_meta_params(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


@contextlib.contextmanager
def stand_in_params(model: nn.Module) -> Iterator[None]:
    """Swap every meta parameter for a fake CPU tensor of the same shape while the block runs (a capture); the real
    parameters (already materialised ones) stay. Ties are kept: one stand-in per parameter object."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    stand_ins: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in stand_ins:
                with mode:
                    fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                stand_ins[id(param)] = nn.Parameter(fake, requires_grad=param.requires_grad)
            swapped.append((module, name, param))
            module._parameters[name] = stand_ins[id(param)]
    try:
        with mode if swapped else contextlib.nullcontext():
            yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def tensor_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every parameter's and buffer's other names (tied weights), keyed by the first name, as named_parameters()."""
    names: dict[int, list[str]] = {}
    for fqn, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(fqn)
    return {group[0]: group[1:] for group in names.values()}


def _module_seed(seed: int, fqn: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{fqn}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str, str]:
    path, _, leaf = fqn.rpartition(".")
    return (model.get_submodule(path) if path else model), path, leaf


def materialise(model: nn.Module, fqns: list[str], *, values: Mapping[str, torch.Tensor] | None = None,
                seed: int = 0, dtype: torch.dtype | None = None,
                on_param: Callable[[str, nn.Parameter], None] | None = None) -> dict[str, nn.Parameter]:
    """Give the meta parameters named ``fqns`` (first names, as a stage's ``spec.params``) real storage on the CPU,
    in ``model`` under every name they have (ties stay tied). Values come from ``values`` when given (a weights file),
    else from the seeded initialisation described in the module doc. Returns the new parameters by first name.
    Names that are buffers or already real are skipped (buffers are built for real)."""
    aliases = tensor_aliases(model)
    wanted = [f for f in fqns if _is_meta_param(model, f)]
    new: dict[str, nn.Parameter] = {}
    for fqn in wanted:
        module, _, leaf = _owner(model, fqn)
        meta = module._parameters[leaf]
        assert meta is not None
        target = dtype if dtype is not None and meta.dtype.is_floating_point else meta.dtype
        if values is not None:
            data = values[fqn].to(target)
        else:
            data = torch.empty(meta.shape, dtype=target)
        new[fqn] = nn.Parameter(data, requires_grad=meta.requires_grad)
    if values is None:
        _seeded_init(model, new, seed)
    for fqn, param in new.items():
        for name in [fqn, *aliases.get(fqn, [])]:
            module, _, leaf = _owner(model, name)
            module._parameters[leaf] = param
        if on_param is not None:
            on_param(fqn, param)
    return new


def release(model: nn.Module, keep: set[str]) -> None:
    """Move every parameter whose first name is not in ``keep`` to the meta device (under all its names): a process
    that built the whole model keeps only the weights of the stages it runs."""
    for fqn, aliases in tensor_aliases(model).items():
        if fqn in keep or not _is_param(model, fqn) or _is_meta_param(model, fqn):
            continue
        module, _, leaf = _owner(model, fqn)
        old = module._parameters[leaf]
        assert old is not None
        meta = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"), requires_grad=old.requires_grad)
        for name in [fqn, *aliases]:
            owner, _, attr = _owner(model, name)
            owner._parameters[attr] = meta


def held_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters that have storage (not on the meta device), each tied weight once."""
    return sum(p.nbytes for p in model.parameters() if not p.is_meta)


def _is_param(model: nn.Module, fqn: str) -> bool:
    module, _, leaf = _owner(model, fqn)
    return module._parameters.get(leaf) is not None


def _is_meta_param(model: nn.Module, fqn: str) -> bool:
    module, _, leaf = _owner(model, fqn)
    param = module._parameters.get(leaf)
    return param is not None and param.device.type == "meta"


def _seeded_init(model: nn.Module, new: dict[str, nn.Parameter], seed: int) -> None:
    """Initialise ``new`` (first name -> fresh parameter) module by module, each under its own seed. A module always
    initialises all of its direct parameters (those another stage owns go to scratch tensors and are dropped), so it
    draws the same random numbers in every layout; a tied weight is initialised once, by the module of its first
    name."""
    by_module: dict[str, dict[str, nn.Parameter]] = {}
    for fqn, param in new.items():
        path, _, leaf = fqn.rpartition(".")
        by_module.setdefault(path, {})[leaf] = param
    hf_init = getattr(model, "_init_weights", None)
    for path, params in by_module.items():
        module = model.get_submodule(path) if path else model
        kept = dict(module._parameters)
        for leaf, value in kept.items():
            if value is not None:
                module._parameters[leaf] = params[leaf] if leaf in params else nn.Parameter(
                    torch.empty(value.shape, dtype=value.dtype), requires_grad=value.requires_grad)
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(_module_seed(seed, path))
                _init_module(module, params, hf_init)
        finally:
            module._parameters.update(kept)


def _init_module(module: nn.Module, params: dict[str, nn.Parameter], hf_init: Any) -> None:
    initial = module.__dict__.get(_INIT_VALUES, {})
    for leaf, param in params.items():
        if leaf in initial:
            param.copy_(initial[leaf])
        else:
            param.zero_()
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
    if callable(hf_init):
        _mark_uninitialised(module)
        hf_init(module)


def _mark_uninitialised(module: nn.Module) -> None:
    """Hugging Face's initialisers skip a module (and tensors) flagged as initialised; these are fresh."""
    if getattr(module, "_is_hf_initialized", False):
        module._is_hf_initialized = False
