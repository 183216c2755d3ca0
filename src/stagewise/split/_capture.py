"""Graph capture: run ``torch.export`` (non-strict) over a model and group the captured ops into units.

A *unit* is one call of a module that we do not look inside: a block of a ``ModuleList``/``Sequential``, or a direct
child of the model (or of a module that holds such a list). Units are named by the module's FQN; the k-th extra call of
a module called several times (ALBERT's shared layer) is ``fqn@k``. Ops that belong to no unit (glue code such as mask
or position-id computation) join the next unit in execution order (or the last unit when nothing follows). """

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind

from .._errors import StagewiseError
from ._meta import has_meta_params, stand_in_params
from ._tree import TreeSpec, flatten, leaf_names, unflatten

__all__ = ["Capture", "CaptureError", "capture", "input_leaves"]

log = logging.getLogger(__name__)
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
_ROOT = "model"


class CaptureError(StagewiseError, RuntimeError):
    """The model's forward could not be captured as a graph."""


@dataclasses.dataclass
class Capture:
    """A captured forward pass for one input signature, with every op assigned to a unit."""

    model: nn.Module
    graph: fx.Graph
    input_names: list[str]
    """Names of the tensor leaves of the model inputs (``arg0``, ``input_ids``, ...)."""
    input_nodes: dict[str, fx.Node]
    state_nodes: dict[fx.Node, str]
    """Placeholder -> FQN for parameters and buffers."""
    constants: dict[fx.Node, torch.Tensor]
    output_nodes: list[fx.Node | None]
    """Producer of every output leaf (None when the leaf is a model input passed straight through)."""
    output_inputs: dict[int, str]
    """Output leaves that are model inputs returned unchanged: leaf index -> input name."""
    out_spec: TreeSpec
    output_names: list[str]
    units: list[str]
    node_unit: dict[fx.Node, int]
    """Unit index of every compute node."""
    signature: tuple[Any, ...]
    training: bool

    def compute_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n in self.node_unit]


def input_leaves(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[str], TreeSpec]:
    """Flatten ``(args, kwargs)`` into tensor leaves with readable names (``arg0``, ``attention_mask``)."""
    leaves, spec = flatten((tuple(args), dict(kwargs)))
    raw = leaf_names(spec)
    names = []
    for name in raw:
        head, _, rest = name.partition(".")
        if head == "0":
            idx, _, tail = rest.partition(".")
            names.append(f"arg{idx}" + (f".{tail}" if tail else ""))
        else:
            names.append(rest)
    return leaves, names, spec


def signature_of(args: Sequence[Any], kwargs: dict[str, Any], training: bool) -> tuple[Any, ...]:
    leaves, names, spec = input_leaves(args, kwargs)
    return (training, repr(spec), tuple((n, tuple(t.shape), t.dtype, t.device.type) for n, t in zip(names, leaves)))


class _Flat(nn.Module):
    """Calls the model on rebuilt inputs and returns its output flattened, so export sees only tensors."""

    def __init__(self, model: nn.Module, in_spec: TreeSpec, out_specs: list[TreeSpec]) -> None:
        super().__init__()
        self.model = model
        self._in_spec = in_spec
        # export may run forward on a deep copy of this module; a function is copied as itself, so it reaches the list.
        self._record = lambda spec: out_specs.append(spec)

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = unflatten(self._in_spec, list(leaves))
        out = self.model(*args, **kwargs)
        flat, spec = flatten(out)
        self._record(spec)
        return tuple(flat)


def capture(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any], *, expand: Sequence[str] = (),
            atomic: Sequence[str] = ()) -> Capture:
    """Capture ``model(*args, **kwargs)``.

    ``expand``: extra module FQNs whose children become units. ``atomic``: module FQNs that must be one unit each
    (sub-model and task splits), never looked inside.
    """
    log.info("capturing %s.forward with torch.export", type(model).__name__)  # tests count these: who captures
    leaves, names, in_spec = input_leaves(args, kwargs)
    out_specs: list[TreeSpec] = []
    flat = _Flat(model, in_spec, out_specs)
    try:
        # On failure export dumps the partial graph to stderr; the error message below says what matters.
        # A model built on the meta device is captured with fake CPU stand-ins for the weights it does not hold.
        stand_in = stand_in_params(model) if has_meta_params(model) else contextlib.nullcontext()
        with contextlib.redirect_stderr(io.StringIO()), stand_in:
            ep = torch.export.export(flat, tuple(leaves), strict=False)
    except Exception as exc:  # torch raises many exception types from inside tracing
        raise CaptureError(f"torch.export could not capture {type(model).__name__}.forward: "
                           f"{type(exc).__name__}: {_first_line(exc)}{_user_frame(exc)}") from exc
    assert out_specs, "export did not run forward"
    gm = ep.graph_module
    graph = gm.graph
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    state_nodes: dict[fx.Node, str] = {}
    constants: dict[fx.Node, torch.Tensor] = {}
    input_nodes: dict[str, fx.Node] = {}
    user_i = 0
    for spec in ep.graph_signature.input_specs:
        node = placeholders[spec.arg.name]
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            assert spec.target is not None and spec.target.startswith(_ROOT + ".")
            state_nodes[node] = spec.target[len(_ROOT) + 1:]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            assert spec.target is not None
            constants[node] = ep.constants[spec.target]
        elif spec.kind == InputKind.USER_INPUT:
            input_nodes[names[user_i]] = node
            user_i += 1
        else:
            raise CaptureError(f"unsupported graph input kind {spec.kind} ({spec.arg.name})")
    # A tied weight has several FQNs; name it as model.named_parameters() does (its first name, e.g. the embedding).
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for fqn, t in [*model.named_parameters(), *model.named_buffers()]:
        first_name.setdefault(id(t), fqn)
    state_nodes = {node: first_name.get(id(tensors[fqn]), fqn) if fqn in tensors else fqn
                   for node, fqn in state_nodes.items()}
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_args = list(out_node.args[0])
    output_nodes: list[fx.Node | None] = []
    output_inputs: dict[int, str] = {}
    node_to_input = {node: name for name, node in input_nodes.items()}
    user_outputs = [(s, a) for s, a in zip(ep.graph_signature.output_specs, out_args)]
    for spec, arg in user_outputs:
        if spec.kind == OutputKind.USER_OUTPUT:
            if isinstance(arg, fx.Node) and arg in node_to_input:
                output_inputs[len(output_nodes)] = node_to_input[arg]
                output_nodes.append(None)
            elif isinstance(arg, fx.Node) and (arg in state_nodes or arg in constants):
                raise CaptureError("a model output that is a parameter or buffer itself is not supported")
            else:
                output_nodes.append(arg if isinstance(arg, fx.Node) else None)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            raise CaptureError("functional buffer mutations are not supported by this torch version's export")
        else:
            raise CaptureError(f"unsupported graph output kind {spec.kind}")
    units, node_unit = _assign_units(model, graph, expand=expand, atomic=atomic)
    return Capture(model=model, graph=graph, input_names=names, input_nodes=input_nodes, state_nodes=state_nodes,
                   constants=constants, output_nodes=output_nodes, output_inputs=output_inputs,
                   out_spec=out_specs[-1], output_names=leaf_names(out_specs[-1]), units=units, node_unit=node_unit,
                   signature=signature_of(args, kwargs, model.training), training=model.training)


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


def _user_frame(exc: BaseException) -> str:
    """`` (at file:line: code)`` when torch's message names the user code that failed, else ``""``."""
    lines = str(exc).splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("The following call raised this error") and i + 2 < len(lines):
            where, code = lines[i + 1].strip(), lines[i + 2].strip()
            if where.startswith("File "):
                return f" (at {where.removeprefix('File ')}: {code})"
    return ""


def _module_calls(node: fx.Node) -> list[tuple[str, str]]:
    """(unit-style call name, module FQN) for each module call enclosing ``node``, outermost first, root excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    calls = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else str(value)
        if path in ("", _ROOT):
            continue
        if not path.startswith(_ROOT + "."):
            continue
        fqn = path[len(_ROOT) + 1:]
        suffix = key.rpartition("@")[2] if "@" in key else ""
        calls.append((f"{fqn}@{suffix}" if suffix else fqn, fqn))
    return calls


def _should_expand(module: nn.Module) -> bool:
    """Look inside modules that hold a list of blocks (directly or further down) or are themselves containers."""
    if isinstance(module, _CONTAINERS):
        return True
    for sub in module.modules():
        if sub is not module and isinstance(sub, _CONTAINERS) and len(sub) >= 1:
            return True
    return False


def _assign_units(model: nn.Module, graph: fx.Graph, *, expand: Sequence[str],
                  atomic: Sequence[str]) -> tuple[list[str], dict[fx.Node, int]]:
    expand_cache: dict[str, bool] = {}

    def expanded(fqn: str) -> bool:
        if fqn in atomic or any(fqn.startswith(a + ".") for a in atomic):
            return False
        if any(a.startswith(fqn + ".") for a in atomic) or fqn in expand:
            return True
        if fqn not in expand_cache:
            expand_cache[fqn] = _should_expand(model.get_submodule(fqn))
        return expand_cache[fqn]

    keys: list[tuple[fx.Node, str | None]] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            keys.append((node, "^producer"))
            continue
        unit = None
        for call, fqn in _module_calls(node):
            if not expanded(fqn):
                unit = call
                break
        keys.append((node, unit))
    # Glue (no unit) joins the next unit; trailing glue joins the last one. getitem follows its producer.
    units: list[str] = []
    node_unit: dict[fx.Node, int] = {}
    pending: list[fx.Node] = []
    for node, key in keys:
        if key == "^producer":
            producer = node.args[0]
            if producer in node_unit:
                node_unit[node] = node_unit[producer]
            else:
                pending.append(node)
            continue
        if key is None:
            pending.append(node)
            continue
        if not units or units[-1] != key:
            if key in units:
                raise CaptureError(f"the ops of module call {key!r} are not contiguous in the captured graph")
            units.append(key)
        for p in pending:
            node_unit[p] = len(units) - 1
        pending = []
        node_unit[node] = len(units) - 1
    if not units:
        units.append("<forward>")
    for p in pending:
        node_unit[p] = len(units) - 1
    return units, node_unit
