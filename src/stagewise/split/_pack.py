"""Stages as data: what a process needs to run some stages, without the model's weights and without capturing.

A :class:`StagePack` holds graph modules whose parameters are on the meta device (buffers and lifted constants are
real: they are small and must hold their true values), the :class:`Partition`, and how stage outputs rebuild the
model's output. The launching process captures once and hands each process the pack of its own stages; the process
fills in the parameters it made or read (:meth:`StagePack.fill`) and never captures the model itself.

A pack travels as bytes (:meth:`StagePack.to_bytes`, :mod:`._wire`): JSON for the graphs and the partition,
safetensors for the tensors, operators named from a whitelist; nothing in it is unpickled, so a rank may read its
pack from another host (the rendezvous store under torchrun).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._build import Stage
from ._partition import Partition
from ._tree import TreeSpec
from ._wire import decode_pack, encode_pack

__all__ = ["StagePack", "strip_weights"]


@dataclasses.dataclass
class StagePack:
    """Some stages of a split model, without weights (see the module doc)."""

    partition: Partition
    stages: dict[int, Stage]
    """The stages by index, their parameters on the meta device until :meth:`fill`."""
    out_spec: TreeSpec
    """The model output's tree: the stages' outputs are its leaves."""
    output_names: list[str]
    """The model output's leaf names, in leaf order."""

    def param_names(self) -> list[str]:
        """FQNs of the parameters these stages own (first names of tied weights)."""
        out = []
        for st in self.stages.values():
            params = {name for name, _ in st.module.named_parameters()}
            out += [fqn for fqn in st.spec.params if fqn in params]
        return out

    def fill(self, params: Mapping[str, nn.Parameter]) -> None:
        """Put ``params`` (FQN -> parameter) into the stages, in place of their meta stand-ins."""
        for st in self.stages.values():
            for name, _ in list(st.module.named_parameters(remove_duplicate=False)):
                if name in params:
                    _set_param(st.module, name, params[name])

    def held_param_bytes(self) -> int:
        return sum(p.nbytes for st in self.stages.values() for p in st.module.parameters() if not p.is_meta)

    def to_bytes(self) -> bytes:
        """This pack as data for another process, here or on another host (:mod:`._wire`: JSON and safetensors,
        nothing pickled); raises :class:`~stagewise.split.PackError` for a graph that cannot travel as data."""
        return encode_pack(self.partition, self.stages, self.out_spec, self.output_names)

    @classmethod
    def from_bytes(cls, data: bytes, *, trusted_modules: Iterable[str] = ()) -> StagePack:
        """Read :meth:`to_bytes`'s output; ``trusted_modules``: modules (the model's own) whose classes the output's
        tree may name besides the whitelist of :mod:`._wire`."""
        decoded = decode_pack(data, trusted_modules=trusted_modules)
        return cls(partition=decoded.partition, stages=decoded.stages, out_spec=decoded.out_spec,
                   output_names=decoded.output_names)

    def __getstate__(self) -> dict[str, Any]:
        # fx.GraphModule pickles as Python code that is traced again on load, which folds ops on real buffers into
        # new constants; a pack inside something pickled (a serving worker's assignment) travels as its safe bytes.
        # Pickle only goes to processes this one starts, so the classes of the output's tree are trusted as they are.
        return {"wire": self.to_bytes(), "trusted": sorted(_type_modules(self.out_spec))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(StagePack.from_bytes(state["wire"], trusted_modules=state["trusted"]).__dict__)


def _type_modules(spec: TreeSpec) -> set[str]:
    """The modules of every class in ``spec``."""
    own = {spec.type.__module__} if spec.type is not None else set()
    return own.union(*(_type_modules(child) for child in spec.children))


def strip_weights(stages: Mapping[int, Stage]) -> None:
    """Replace every parameter of ``stages`` by a meta twin (ties kept), in the stages' own graph modules only."""
    twins: dict[int, nn.Parameter] = {}
    for st in stages.values():
        for name, p in list(st.module.named_parameters(remove_duplicate=False)):
            if id(p) not in twins:
                twins[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                            requires_grad=p.requires_grad)
            _set_param(st.module, name, twins[id(p)])


def _set_param(module: nn.Module, fqn: str, param: nn.Parameter) -> None:
    path, _, leaf = fqn.rpartition(".")
    owner = module.get_submodule(path) if path else module
    owner._parameters[leaf] = param
