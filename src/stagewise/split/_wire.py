"""A :class:`~stagewise.split.StagePack` on the wire: JSON for the graphs and the partition, safetensors for tensors.

A pack goes from the rank that captured the model to ranks on other hosts (through the rendezvous store), so it is
read as data that may come from anywhere: nothing is unpickled and no name is turned into code unless a whitelist
allows it. What a stage graph may call:

- ``torch.ops.<namespace>.<op>.<overload>``, by its qualified name (``aten::add.Tensor``); custom operators resolve
  once the model's code registered them, like any operator;
- ``torch.ops.higher_order.<name>``;
- the functions of :mod:`operator` and the builtins ``getattr``/``len``.

Arguments are JSON values, nodes by name, tuples, slices, dtypes, devices, layouts and memory formats. The output's
tree (:class:`~stagewise.split.TreeSpec`) may name list, tuple, dict, ``collections.OrderedDict`` and the classes of
``transformers`` and ``torch.return_types`` (Hugging Face outputs and caches), plus the modules the caller trusts (the
model's own). Anything else is a :class:`PackError` that names the stage, the node and what it holds.

Layout: ``MAGIC``, the header's length (8 bytes, little-endian), the header (UTF-8 JSON), then one safetensors blob
with every real tensor (buffers, lifted constants; parameters travel as shape and dtype, on the meta device).
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import importlib
import json
import operator
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from .._errors import StagewiseError
from ._build import Stage
from ._partition import Partition, StageSpec
from ._tree import TreeSpec

__all__ = ["PackError", "decode_pack", "encode_pack"]

MAGIC = b"STAGEWISE-PACK/1\n"
_LENGTH = struct.Struct("<Q")
_BUILTINS = {"getattr": builtins.getattr, "len": builtins.len}
_TYPES: dict[str, type] = {"builtins.list": list, "builtins.tuple": tuple, "builtins.dict": dict,
                           "collections.OrderedDict": collections.OrderedDict}
_TRUSTED_PREFIXES = ("transformers.", "torch.return_types")


class PackError(StagewiseError, ValueError):
    """A pack that cannot be written or read as data: an operator or value outside the whitelist, or bytes that are
    not a pack."""


@dataclasses.dataclass
class Decoded:
    """What :func:`decode_pack` read, for :class:`~stagewise.split.StagePack` to hold."""

    partition: Partition
    stages: dict[int, Stage]
    out_spec: TreeSpec
    output_names: list[str]


def encode_pack(partition: Partition, stages: Mapping[int, Stage], out_spec: TreeSpec,
                output_names: list[str]) -> bytes:
    """The pack as bytes (see the module doc); raises :class:`PackError` for what cannot travel as data."""
    from safetensors.torch import save

    blobs: dict[str, torch.Tensor] = {}
    header = {"partition": partition.to_dict(), "output_names": list(output_names),
              "out_spec": _tree_to_json(out_spec),
              "stages": {str(i): _stage_to_json(st, blobs) for i, st in stages.items()}}
    head = json.dumps(header).encode()
    return b"".join([MAGIC, _LENGTH.pack(len(head)), head, save(blobs) if blobs else b""])


def decode_pack(data: bytes, *, trusted_modules: Iterable[str] = ()) -> Decoded:
    """Read bytes written by :func:`encode_pack`. ``trusted_modules``: modules (the model's own) whose classes the
    output's tree may name besides the built-in whitelist."""
    from safetensors.torch import load

    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _LENGTH.size:
        raise PackError(f"not a Stagewise stage pack (it does not start with {MAGIC!r})")
    (n,) = _LENGTH.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if start + n > len(data):
        raise PackError(f"stage pack cut short: its header says {n} bytes, {len(data) - start} follow")
    try:
        header = json.loads(data[start:start + n])
    except ValueError as exc:
        raise PackError(f"stage pack header is not JSON: {exc}") from None
    rest = data[start + n:]
    trusted = tuple(trusted_modules)
    try:
        blobs = load(rest) if rest else {}
        return Decoded(partition=Partition.from_dict(header["partition"]),
                       stages={int(i): _stage_from_json(s, blobs) for i, s in header["stages"].items()},
                       out_spec=_tree_from_json(header["out_spec"], trusted),
                       output_names=list(header["output_names"]))
    except PackError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise PackError(f"stage pack is malformed: {type(exc).__name__}: {exc}") from None


# --- graph nodes ---------------------------------------------------------------------------------------------------


def _stage_to_json(stage: Stage, blobs: dict[str, torch.Tensor]) -> dict[str, Any]:
    module = stage.module
    where = f"stage {stage.index}"
    nodes = []
    for n in module.graph.nodes:
        if n.op in ("call_module", "call_method"):
            raise PackError(f"{where}: node {n.name} is a {n.op} of {n.target!r}; a stage travels as data only "
                            "when its graph calls operators (a graph captured by torch.export, not the module "
                            "fallback)")
        target = _target_to_json(n.target, f"{where}, node {n.name}") if n.op == "call_function" else n.target
        nodes.append([n.op, n.name, target, _value_to_json(n.args, f"{where}, node {n.name}"),
                      _value_to_json(n.kwargs, f"{where}, node {n.name}")])
    tensors: dict[str, dict[str, Any]] = {}
    first: dict[int, str] = {}
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    for name, t in {**params, **buffers}.items():
        entry: dict[str, Any] = {"param": name in params}
        if id(t) in first:  # a tied weight: the same tensor under a second name
            entry["tie"] = first[id(t)]
        else:
            first[id(t)] = name
            entry.update(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."),
                         requires_grad=bool(t.requires_grad), meta=t.is_meta)
            if not t.is_meta:
                blobs[f"{stage.index}/{name}"] = t.detach().cpu().contiguous().clone()
        if name in buffers and not _persistent(module, name):
            entry["non_persistent"] = True
        tensors[name] = entry
    return {"spec": dataclasses.asdict(stage.spec), "output_index": list(stage.output_index), "nodes": nodes,
            "tensors": tensors}


def _persistent(module: nn.Module, name: str) -> bool:
    path, _, leaf = name.rpartition(".")
    return leaf not in (module.get_submodule(path) if path else module)._non_persistent_buffers_set


def _stage_from_json(data: dict[str, Any], blobs: Mapping[str, torch.Tensor]) -> Stage:
    spec = StageSpec.from_dict(data["spec"])
    where = f"stage {spec.index}"
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs in data["nodes"]:
        here = f"{where}, node {name}"
        if op not in ("placeholder", "get_attr", "call_function", "output"):
            raise PackError(f"{here}: op {op!r} is not one a stage pack may hold")
        args, kwargs = _value_from_json(args, env, here), _value_from_json(kwargs, env, here)
        if op == "output":
            graph.output(args[0])
            continue
        fn = _target_from_json(target, here) if op == "call_function" else str(target)
        env[name] = graph.create_node(op, fn, args, kwargs, name=name)
    root = nn.Module()
    made: dict[str, torch.Tensor] = {}
    for path, entry in data["tensors"].items():
        if "tie" in entry:
            tensor = made[entry["tie"]]
        else:
            dtype = _dtype(entry["dtype"], where)
            if entry["meta"]:
                tensor = torch.empty(entry["shape"], dtype=dtype, device="meta")
            else:
                tensor = blobs[f"{spec.index}/{path}"]
                if list(tensor.shape) != entry["shape"] or tensor.dtype != dtype:
                    raise PackError(f"{where}: tensor {path} is {list(tensor.shape)} {tensor.dtype} in the pack's "
                                    f"data but {entry['shape']} {dtype} in its header")
            if entry["param"]:
                tensor = nn.Parameter(tensor, requires_grad=entry["requires_grad"])
            made[path] = tensor
        parent, _, leaf = path.rpartition(".")
        owner = root
        for part in parent.split(".") if parent else []:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if entry["param"]:
            owner.register_parameter(leaf, tensor)
        else:
            owner.register_buffer(leaf, tensor)
    module = fx.GraphModule(root, graph, class_name=f"Stage{spec.index}")
    for path, entry in data["tensors"].items():  # GraphModule copies buffers as persistent ones
        if entry.get("non_persistent"):
            parent, _, leaf = path.rpartition(".")
            (module.get_submodule(parent) if parent else module)._non_persistent_buffers_set.add(leaf)
    return Stage(spec, module, [int(i) for i in data["output_index"]])


def _target_to_json(target: Any, where: str) -> dict[str, str]:
    if isinstance(target, torch._ops.OpOverload):
        return {"op": f"{target._schema.name}.{target._overloadname or 'default'}"}
    if isinstance(target, torch._ops.HigherOrderOperator):
        return {"higher_order": target.name()}
    if getattr(target, "__module__", None) in ("_operator", "operator") and \
            getattr(operator, getattr(target, "__name__", ""), None) is target:
        return {"fn": f"operator.{target.__name__}"}
    for name, fn in _BUILTINS.items():
        if target is fn:
            return {"fn": f"builtins.{name}"}
    raise PackError(f"{where} calls {_qualname(target)}, which cannot travel as data: a stage pack holds only "
                    "torch.ops operators, operator.* and the builtins getattr/len")


def _target_from_json(target: Any, where: str) -> Any:
    if not isinstance(target, dict) or len(target) != 1:
        raise PackError(f"{where}: target {target!r} is not one a stage pack may hold")
    (kind, name), = target.items()
    if kind == "op":
        namespace, _, rest = str(name).partition("::")
        op_name, _, overload = rest.partition(".")
        try:
            found = getattr(getattr(getattr(torch.ops, namespace), op_name), overload or "default")
        except (AttributeError, RuntimeError):
            found = None
        if not isinstance(found, torch._ops.OpOverload):
            raise PackError(f"{where} calls operator {name!r}, which is not registered in this process (a custom "
                            "operator: import the module that defines it)")
        return found
    if kind == "higher_order":
        found = getattr(torch.ops.higher_order, str(name), None)
        if isinstance(found, torch._ops.HigherOrderOperator):
            return found
    if kind == "fn":
        module, _, attr = str(name).partition(".")
        if module == "operator" and not attr.startswith("_") and callable(getattr(operator, attr, None)):
            return getattr(operator, attr)
        if module == "builtins" and attr in _BUILTINS:
            return _BUILTINS[attr]
    raise PackError(f"{where} calls {kind} {name!r}, which is not on the whitelist: a stage pack holds only "
                    "torch.ops operators, operator.* and the builtins getattr/len")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or type(obj).__module__}." \
           f"{getattr(obj, '__qualname__', None) or type(obj).__qualname__}"


# --- values --------------------------------------------------------------------------------------------------------


def _value_to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, list):
        return [_value_to_json(v, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_value_to_json(v, where) for v in value]}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise PackError(f"{where}: a dict argument with keys that are not strings cannot travel as data")
        return {"dict": {k: _value_to_json(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_value_to_json(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.layout, torch.memory_format)):
        return {type(value).__name__: str(value).removeprefix("torch.")}
    raise PackError(f"{where} holds a {_qualname(type(value))} ({value!r:.60}), which cannot travel as data: "
                    "a stage pack holds JSON values, nodes, tuples, slices, dtypes, devices, layouts and memory "
                    "formats")


def _value_from_json(value: Any, env: Mapping[str, fx.Node], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_value_from_json(v, env, where) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise PackError(f"{where}: value {value!r:.60} is not one a stage pack may hold")
    (kind, inner), = value.items()
    if kind == "node":
        if inner not in env:
            raise PackError(f"{where} reads node {inner!r}, which no earlier node made")
        return env[inner]
    if kind == "tuple":
        return tuple(_value_from_json(v, env, where) for v in inner)
    if kind == "dict":
        return {str(k): _value_from_json(v, env, where) for k, v in inner.items()}
    if kind == "slice":
        return slice(*(_value_from_json(v, env, where) for v in inner))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "dtype":
        return _dtype(inner, where)
    if kind == "device":
        return torch.device(str(inner))
    if kind in ("layout", "memory_format"):
        found = getattr(torch, str(inner), None)
        if isinstance(found, torch.layout if kind == "layout" else torch.memory_format):
            return found
    raise PackError(f"{where}: value {value!r:.60} is not one a stage pack may hold")


def _dtype(name: Any, where: str) -> torch.dtype:
    found = getattr(torch, str(name), None)
    if not isinstance(found, torch.dtype):
        raise PackError(f"{where}: {name!r} is not a torch dtype")
    return found


# --- the output's tree ---------------------------------------------------------------------------------------------


def _tree_to_json(spec: TreeSpec) -> dict[str, Any]:
    where = "the model output's tree"
    return {"kind": spec.kind, "type": None if spec.type is None else _qualname(spec.type),
            "keys": [_value_to_json(k, where) for k in spec.keys],
            "children": [_tree_to_json(c) for c in spec.children],
            "value": _value_to_json(spec.value, where)}


def _tree_from_json(data: dict[str, Any], trusted: tuple[str, ...]) -> TreeSpec:
    where = "the model output's tree"
    kind = data["kind"]
    if kind not in ("tensor", "const", "seq", "dict", "object"):
        raise PackError(f"{where}: kind {kind!r} is not one a stage pack may hold")
    return TreeSpec(kind, type=None if data["type"] is None else _type(data["type"], trusted),
                    keys=tuple(_value_from_json(k, {}, where) for k in data["keys"]),
                    children=tuple(_tree_from_json(c, trusted) for c in data["children"]),
                    value=_value_from_json(data["value"], {}, where))


def _type(qualname: str, trusted: tuple[str, ...]) -> type:
    if qualname in _TYPES:
        return _TYPES[qualname]
    module, _, name = qualname.rpartition(".")
    allowed = module.startswith(_TRUSTED_PREFIXES) or module in trusted
    found: Any = None
    if allowed and module and "<" not in name:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
    if not isinstance(found, type):
        raise PackError(f"the model output's tree names the class {qualname!r}, which a stage pack may not name: "
                        "only list, tuple, dict, OrderedDict, classes of transformers and torch.return_types, and of "
                        "the model's own module")
    return found
