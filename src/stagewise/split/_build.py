"""Cut a captured graph into stage graphs: decide what each stage owns, receives, reads and sends, and build modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ._capture import Capture
from ._partition import StageSpec, ValueSpec

__all__ = ["Stage", "build_stage", "plan_stages", "value_bytes"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta(node: fx.Node, cap: Capture) -> tuple[list[int], str]:
    if node in cap.state_nodes:
        t = _state_tensor(cap, cap.state_nodes[node])
        return list(t.shape), _dtype_name(t.dtype)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [int(d) for d in val.shape], _dtype_name(val.dtype)
    return [], "float32"


def _state_tensor(cap: Capture, fqn: str) -> torch.Tensor:
    """The parameter or buffer at ``fqn`` (a lookup by path, not a scan of every parameter)."""
    try:
        return cap.model.get_parameter(fqn)
    except AttributeError:
        return cap.model.get_buffer(fqn)


def value_bytes(node: fx.Node, cap: Capture) -> int:
    shape, dtype = _meta(node, cap)
    n = 1
    for d in shape:
        n *= d
    return n * getattr(torch, dtype).itemsize


def _value_name(node: fx.Node, cap: Capture) -> str:
    return cap.state_nodes.get(node, node.name)


@dataclasses.dataclass
class _Layout:
    """Per-stage node sets and the tree of stages (a chain, or a chain with task heads hanging off its end)."""

    nodes: list[list[fx.Node]]
    parents: list[int | None]
    units: list[list[str]]
    heads: list[str | None]


def _ancestors(parents: list[int | None], s: int) -> list[int]:
    out = []
    p = parents[s]
    while p is not None:
        out.append(p)
        p = parents[p]
    return out


def _common_ancestor(parents: list[int | None], stages: set[int]) -> int:
    paths = [[s, *_ancestors(parents, s)] for s in stages]
    common = set(paths[0]).intersection(*map(set, paths[1:]))
    return next(s for s in paths[0] if s in common)


def plan_stages(cap: Capture, layout: _Layout) -> list[StageSpec]:
    """Derive every stage's owned weights, received/sent values, direct inputs and outputs."""
    n_stages = len(layout.nodes)
    stage_of: dict[fx.Node, int] = {n: s for s, nodes in enumerate(layout.nodes) for n in nodes}
    children: list[list[int]] = [[] for _ in range(n_stages)]
    for s, p in enumerate(layout.parents):
        if p is not None:
            children[p].append(s)
    leaves = [s for s in range(n_stages) if not children[s]]
    # Weights: owned by the common ancestor of all stages that use them (for a chain: the first user).
    users: dict[fx.Node, set[int]] = {}
    for node in cap.state_nodes:
        used = {stage_of[u] for u in node.users if u in stage_of}
        if used:
            users[node] = used
    owner = {node: _common_ancestor(layout.parents, used) for node, used in users.items()}
    _own_unused(cap, owner, default=n_stages - 1)
    defined: list[set[fx.Node]] = [set(nodes) for nodes in layout.nodes]
    for node, s in owner.items():
        defined[s].add(node)
    # What each stage needs from outside itself (values only; model inputs and constants are read locally).
    external: list[list[fx.Node]] = []
    for s, nodes in enumerate(layout.nodes):
        need: dict[fx.Node, None] = {}
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg in defined[s] or arg in cap.constants or arg in cap.input_nodes.values():
                    continue
                need[arg] = None
        external.append(list(need))
    for s in leaves:
        path = {s, *_ancestors(layout.parents, s)}
        for node in cap.output_nodes:
            if node is not None and stage_of.get(node) in path and node not in defined[s] and node not in external[s]:
                external[s].append(node)
    # recv(s) = (external(s) + recv of children) - defined(s), bottom-up; children receive what they need.
    order = sorted(range(n_stages), key=lambda s: -len(_ancestors(layout.parents, s)))
    recv: dict[int, list[fx.Node]] = {}
    for s in order:
        want: dict[fx.Node, None] = dict.fromkeys(external[s])
        for c in children[s]:
            want.update(dict.fromkeys(recv[c]))
        recv[s] = [n for n in want if n not in defined[s]]
    topo = {n: i for i, n in enumerate(cap.graph.nodes)}
    state_order = {fqn: i for i, fqn in enumerate(cap.state_nodes.values())}
    specs = []
    for s in range(n_stages):
        if layout.parents[s] is None and recv[s]:
            missing = ", ".join(_value_name(n, cap) for n in recv[s][:5])
            raise RuntimeError(f"stage {s} needs values no earlier stage produces: {missing}")
        rv = sorted(recv[s], key=lambda n: topo[n])
        sd: dict[fx.Node, None] = {}
        for c in children[s]:
            sd.update(dict.fromkeys(recv[c]))
        sends = sorted(sd, key=lambda n: topo[n])
        used_inputs = {a for node in layout.nodes[s] for a in node.all_input_nodes}
        inputs = [name for name, node in cap.input_nodes.items() if node in used_inputs]
        outputs: list[str] = []
        if s in leaves:
            path = {s, *_ancestors(layout.parents, s)}
            for i, node in enumerate(cap.output_nodes):
                if node is None and i in cap.output_inputs:
                    outputs.append(cap.output_names[i])
                    if cap.output_inputs[i] not in inputs:
                        inputs.append(cap.output_inputs[i])
                elif node is not None and stage_of.get(node) in path:
                    outputs.append(cap.output_names[i])

        def spec(node: fx.Node) -> ValueSpec:
            shape, dtype = _meta(node, cap)
            kind = "parameter" if node in cap.state_nodes else "activation"
            return ValueSpec(name=_value_name(node, cap), shape=shape, dtype=dtype, kind=kind)

        specs.append(StageSpec(
            index=s, units=layout.units[s], parent=layout.parents[s],
            params=sorted((cap.state_nodes[n] for n, o in owner.items() if o == s), key=state_order.__getitem__),
            recv=[spec(n) for n in rv], inputs=inputs, send=[spec(n) for n in sends], outputs=outputs,
            head=layout.heads[s]))
    return specs


def _own_unused(cap: Capture, owner: dict[fx.Node, int], *, default: int) -> None:
    """Give every weight the forward does not read (for these inputs) to the stage owning its nearest used relative
    by FQN (a sibling in the same module, else in the parent...), else to ``default``: it is still the model's state,
    so checkpoints, exports and ``load_into`` must hold it."""
    by_fqn = {cap.state_nodes[n]: s for n, s in owner.items()}
    for node, fqn in cap.state_nodes.items():
        if node in owner or fqn in by_fqn:  # used, or a second name of a tied weight that is used
            continue
        prefix = fqn.rpartition(".")[0]
        while prefix:
            near = [s for f, s in by_fqn.items() if f.startswith(prefix + ".")]
            if near:
                owner[node] = min(near)
                break
            prefix = prefix.rpartition(".")[0]
        else:
            owner[node] = default
        by_fqn[fqn] = owner[node]


class Stage:
    """A runnable stage: a graph module holding only this stage's weights (named by their original FQNs)."""

    def __init__(self, spec: StageSpec, module: fx.GraphModule, output_index: list[int]) -> None:
        self.spec = spec
        self.module = module
        self.output_index = output_index
        """For every entry of ``spec.outputs``: its leaf index in the model's output."""

    @property
    def index(self) -> int:
        return self.spec.index

    def parameters(self) -> Any:
        return self.module.parameters()

    def named_parameters(self) -> Any:
        return self.module.named_parameters()

    def __call__(self, recv: Sequence[Any], inputs: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
        """Run the stage. Returns (values to send, in ``spec.send`` order; model outputs, in ``spec.outputs`` order)."""
        if len(recv) != len(self.spec.recv):
            raise ValueError(f"stage {self.index} expects {len(self.spec.recv)} received values, got {len(recv)}")
        try:
            args = [*recv, *(inputs[name] for name in self.spec.inputs)]
        except KeyError as exc:
            raise ValueError(f"stage {self.index} needs model input {exc.args[0]!r}; inputs given: "
                             f"{sorted(inputs)}") from None
        out = self.module(*args)
        n_send = len(self.spec.send)
        return list(out[:n_send]), list(out[n_send:])

    def __repr__(self) -> str:
        units = self.spec.units
        span = units[0] if len(units) == 1 else f"{units[0]}..{units[-1]}"
        return f"Stage({self.index}: {span}, {len(self.spec.params)} weights)"


def build_stage(cap: Capture, spec: StageSpec, nodes: Sequence[fx.Node]) -> Stage:
    """Build the graph module of one stage; weights are the model's own Parameter objects (shared, not copied)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {_value_name(n, cap): n for n in [*cap.graph.nodes]}
    state_by_fqn = {fqn: node for node, fqn in cap.state_nodes.items()}
    for i, v in enumerate(spec.recv):
        src = state_by_fqn[v.name] if v.kind == "parameter" else by_name[v.name]
        env[src] = graph.placeholder(f"recv_{i}")
    for name in spec.inputs:
        env[cap.input_nodes[name]] = graph.placeholder(_safe(name))
    root = nn.Module()
    model = cap.model
    for name, child in model.named_children():
        root.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        root.register_buffer(name, b)
    for fqn in spec.params:
        env[state_by_fqn[fqn]] = graph.get_attr(fqn)
    const_i = 0
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in cap.constants and arg not in env:
                attr = f"_stagewise_const{const_i}"
                const_i += 1
                root.register_buffer(attr, cap.constants[arg].clone())
                env[arg] = graph.get_attr(attr)
        env[node] = graph.node_copy(node, lambda n: env[n])
    send_nodes = [state_by_fqn[v.name] if v.kind == "parameter" else by_name[v.name] for v in spec.send]
    name_to_leaf = {name: i for i, name in enumerate(cap.output_names)}
    out_nodes = []
    output_index = []
    for out_name in spec.outputs:
        leaf = name_to_leaf[out_name]
        output_index.append(leaf)
        if leaf in cap.output_inputs:
            out_nodes.append(env[cap.input_nodes[cap.output_inputs[leaf]]])
        else:
            node = cap.output_nodes[leaf]
            assert node is not None
            out_nodes.append(env[node])
    graph.output(tuple([env[n] for n in send_nodes] + out_nodes))
    module = fx.GraphModule(root, graph, class_name=f"Stage{spec.index}")
    _keep_non_persistent(model, module, spec.params)
    return Stage(spec, module, output_index)


def _keep_non_persistent(model: nn.Module, module: nn.Module, fqns: Sequence[str]) -> None:
    for fqn in fqns:
        owner_path, _, leaf = fqn.rpartition(".")
        src = model.get_submodule(owner_path) if owner_path else model
        if leaf in getattr(src, "_non_persistent_buffers_set", ()):
            dst = module.get_submodule(owner_path) if owner_path else module
            dst._non_persistent_buffers_set.add(leaf)


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name)
    return f"in_{out}"
