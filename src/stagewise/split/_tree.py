"""Flatten arbitrary model inputs and outputs into named tensor leaves, and rebuild them.

Model outputs are not always plain tensors: Hugging Face returns ``ModelOutput`` dataclasses holding cache objects
(``DynamicCache`` with lists of layers), dicts, tuples. We flatten any such tree into a list of tensors plus a
:class:`TreeSpec` that rebuilds the same Python objects, without registering anything globally and without pickle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TreeSpec", "flatten", "leaf_names", "unflatten"]

_SCALARS = (int, float, bool, str, bytes, type(None), torch.device, torch.dtype, torch.Size, slice, type(Ellipsis))
_MAX_DEPTH = 64


@dataclasses.dataclass(frozen=True)
class TreeSpec:
    """How to rebuild a tree from its tensor leaves. ``kind`` is one of tensor/const/seq/dict/object."""

    kind: str
    type: type | None = None
    keys: tuple[Any, ...] = ()
    children: tuple[TreeSpec, ...] = ()
    value: Any = None
    """For ``tensor``: the leaf index; for ``const``: the constant itself."""

    @property
    def num_leaves(self) -> int:
        if self.kind == "tensor":
            return 1
        return sum(child.num_leaves for child in self.children)


def flatten(tree: Any, *, _depth: int = 0,
            _leaves: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], TreeSpec]:
    """Return the tensors of ``tree`` in a deterministic order and the spec that rebuilds it."""
    leaves: list[torch.Tensor] = [] if _leaves is None else _leaves
    if _depth > _MAX_DEPTH:
        raise ValueError(f"cannot flatten a value nested more than {_MAX_DEPTH} levels deep (a cycle?)")
    spec = _flatten(tree, leaves, _depth)
    return leaves, spec


def _flatten(obj: Any, leaves: list[torch.Tensor], depth: int) -> TreeSpec:
    if isinstance(obj, torch.Tensor):
        leaves.append(obj)
        return TreeSpec("tensor", value=len(leaves) - 1)
    if isinstance(obj, _SCALARS) or callable(obj) and not hasattr(obj, "__dict__"):
        return TreeSpec("const", value=obj)
    if depth > _MAX_DEPTH:
        raise ValueError(f"cannot flatten a value nested more than {_MAX_DEPTH} levels deep (a cycle?)")
    if isinstance(obj, (list, tuple)):
        kids = tuple(_flatten(item, leaves, depth + 1) for item in obj)
        return TreeSpec("seq", type=type(obj), children=kids)
    if isinstance(obj, Mapping):
        keys = tuple(obj.keys())
        kids = tuple(_flatten(obj[k], leaves, depth + 1) for k in keys)
        return TreeSpec("dict", type=type(obj), keys=keys, children=kids)
    if isinstance(obj, torch.nn.Module):
        raise ValueError(f"cannot carry a torch.nn.Module ({type(obj).__name__}) across a stage boundary")
    state = _object_state(obj)
    if state is None:
        return TreeSpec("const", value=obj)
    keys = tuple(state.keys())
    kids = tuple(_flatten(state[k], leaves, depth + 1) for k in keys)
    return TreeSpec("object", type=type(obj), keys=keys, children=kids)


def _object_state(obj: Any) -> dict[str, Any] | None:
    state: dict[str, Any] = {}
    if hasattr(obj, "__dict__"):
        state.update(vars(obj))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                state[slot] = getattr(obj, slot)
    if not state and not hasattr(obj, "__dict__"):
        return None
    return state


def unflatten(spec: TreeSpec, leaves: list[Any]) -> Any:
    """Rebuild the tree described by ``spec``; leaves missing from ``leaves`` (a shorter list or None) stay None."""
    if spec.kind == "tensor":
        index = spec.value
        return leaves[index] if index < len(leaves) else None
    if spec.kind == "const":
        return spec.value
    kids = [unflatten(child, leaves) for child in spec.children]
    cls = spec.type
    assert cls is not None
    if spec.kind == "seq":
        if cls in (list, tuple):
            return cls(kids)
        if hasattr(cls, "_fields"):  # namedtuple
            return cls(*kids)
        return cls(kids)
    if spec.kind == "dict":
        items = dict(zip(spec.keys, kids))
        if cls is dict:
            return items
        if dataclasses.is_dataclass(cls):  # Hugging Face ModelOutput: only the fields that were set
            return cls(**items)
        try:
            return cls(items)
        except TypeError:
            return cls(**items)
    obj = cls.__new__(cls)
    for key, value in zip(spec.keys, kids):
        object.__setattr__(obj, key, value)
    return obj


def leaf_names(spec: TreeSpec, prefix: str = "") -> list[str]:
    """A readable dotted name for every tensor leaf, in leaf order (``logits``, ``past_key_values.layers.0.keys``)."""
    names: list[str] = []

    def walk(node: TreeSpec, path: str) -> None:
        if node.kind == "tensor":
            names.append(path or "output")
        elif node.kind == "seq":
            for i, child in enumerate(node.children):
                walk(child, f"{path}.{i}" if path else str(i))
        elif node.kind in ("dict", "object"):
            for key, child in zip(node.keys, node.children):
                walk(child, f"{path}.{key}" if path else str(key))

    walk(spec, prefix)
    return names
