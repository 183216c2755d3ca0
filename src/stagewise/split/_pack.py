"""Stages as data: what a process needs to run some stages, without the model's weights and without capturing.

A :class:`StagePack` holds graph modules whose parameters are on the meta device (buffers and lifted constants are
real: they are small and must hold their true values), the :class:`Partition`, and how stage outputs rebuild the
model's output. The launching process captures once and hands each process the pack of its own stages; the process
fills in the parameters it made or read (:meth:`StagePack.fill`) and never captures the model itself.

A pack travels only from a process to the processes it starts on this machine (pickled by ``multiprocessing``, as
any start argument is); it is never read from the network or from a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

from ._build import Stage
from ._partition import Partition
from ._tree import TreeSpec

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

    def __getstate__(self) -> dict[str, Any]:
        # fx.GraphModule pickles as Python code that is traced again on load, which folds ops on real buffers into
        # new constants; a stage travels as its nodes and its tensors instead, and is rebuilt node for node.
        state = dict(self.__dict__)
        state["stages"] = {i: _StageData.of(st) for i, st in self.stages.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["stages"] = {i: data.build() for i, data in state["stages"].items()}
        self.__dict__.update(state)


@dataclasses.dataclass
class _Ref:
    """A node argument that is another node, by name."""

    name: str


@dataclasses.dataclass
class _Op:
    """An operator overload by name (``torch.ops.aten.add.Tensor`` does not pickle)."""

    namespace: str
    name: str
    overload: str

    def resolve(self) -> Any:
        packet = getattr(getattr(torch.ops, self.namespace), self.name)
        return getattr(packet, self.overload) if self.overload else packet


def _target(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverload):
        namespace, _, name = target._schema.name.partition("::")
        return _Op(namespace, name, target._overloadname or "default")
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _Op("higher_order", target.name(), "")
    return target


@dataclasses.dataclass
class _StageData:
    """A stage as plain data: its spec, its graph's nodes and its tensors by attribute path."""

    spec: Any
    output_index: list[int]
    nodes: list[tuple[str, str, Any, Any, Any]]
    tensors: dict[str, torch.Tensor]
    params: set[str]
    non_persistent: set[str]

    @classmethod
    def of(cls, stage: Stage) -> _StageData:
        def ref(arg: Any) -> Any:
            return fx.node.map_arg(arg, lambda n: _Ref(n.name))

        nodes = [(n.op, n.name, _target(n.target), ref(n.args), ref(n.kwargs)) for n in stage.module.graph.nodes]
        module = stage.module
        params = dict(module.named_parameters(remove_duplicate=False))
        buffers = dict(module.named_buffers(remove_duplicate=False))
        non_persistent = set()
        for name in buffers:
            path, _, leaf = name.rpartition(".")
            if leaf in (module.get_submodule(path) if path else module)._non_persistent_buffers_set:
                non_persistent.add(name)
        return cls(spec=stage.spec, output_index=list(stage.output_index), nodes=nodes, tensors={**params, **buffers},
                   params=set(params), non_persistent=non_persistent)

    def build(self) -> Stage:
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}

        def deref(arg: Any) -> Any:
            return fx.node.map_aggregate(arg, lambda a: env[a.name] if isinstance(a, _Ref) else a)

        for op, name, target, args, kwargs in self.nodes:
            target = target.resolve() if isinstance(target, _Op) else target
            if op == "output":
                graph.output(deref(args)[0])
                continue
            env[name] = graph.create_node(op, target, deref(args), deref(kwargs), name=name)
        root = nn.Module()
        for path, tensor in self.tensors.items():
            parent, _, leaf = path.rpartition(".")
            owner = root
            for part in parent.split(".") if parent else []:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            if path in self.params:
                owner.register_parameter(leaf, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
            else:
                owner.register_buffer(leaf, tensor)
        module = fx.GraphModule(root, graph, class_name=f"Stage{self.spec.index}")
        for path in self.non_persistent:  # GraphModule copies buffers as persistent ones
            parent, _, leaf = path.rpartition(".")
            (module.get_submodule(parent) if parent else module)._non_persistent_buffers_set.add(leaf)
        return Stage(self.spec, module, self.output_index)


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
