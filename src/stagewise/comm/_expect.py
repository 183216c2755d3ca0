"""Boundary checks: does what arrived match what the receiving stage expects (shape, dtype, kind)?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._errors import BoundaryMismatchError
from ._framing import Value

__all__ = ["check_expect"]


def _normalise_spec(spec: Any) -> tuple[tuple[int, ...], torch.dtype] | type | None:
    if spec is None or isinstance(spec, type):
        return spec
    if hasattr(spec, "shape") and hasattr(spec, "dtype"):
        shape, dtype = spec.shape, spec.dtype
    else:
        shape, dtype = spec
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"expect: unknown dtype name {dtype!r}")
        dtype = getattr(torch, name)
    return tuple(int(s) for s in shape), dtype


def _show(v: Value) -> str:
    if isinstance(v, torch.Tensor):
        return f"shape {tuple(v.shape)} dtype {v.dtype}"
    return f"{type(v).__name__} {v!r}"


def check_expect(values: Sequence[Value], expect: Sequence[Any] | None, *, where: str) -> None:
    """Raise :class:`BoundaryMismatchError` unless ``values`` match ``expect``.

    Each spec is ``(shape, dtype)`` (dtype a ``torch.dtype`` or its name; a dim of -1 matches any size), an object with
    ``.shape`` and ``.dtype`` (e.g. ``split.ValueSpec``), a python type (``int``, ``float``, ``bool``, ``type(None)``)
    for a scalar, or None to accept anything at that position.
    """
    if expect is None:
        return
    if len(expect) != len(values):
        got = ", ".join(_show(v) for v in values)
        raise BoundaryMismatchError(
            f"{where}: expected {len(expect)} values, received {len(values)} ({got}); the sending stage's outputs "
            "do not match this stage's inputs (re-split, or fix the stage boundary)",
            index=None, expected=f"{len(expect)} values", received=f"{len(values)} values")
    for i, (v, raw) in enumerate(zip(values, expect)):
        spec = _normalise_spec(raw)
        if spec is None:
            continue
        if isinstance(spec, type):
            ok = (type(v) is bool) == (spec is bool) and isinstance(v, spec) and not isinstance(v, torch.Tensor)
            expected = spec.__name__
        else:
            shape, dtype = spec
            ok = (isinstance(v, torch.Tensor) and v.dtype == dtype and v.dim() == len(shape)
                  and all(e in (-1, r) for e, r in zip(shape, v.shape)))
            expected = f"shape {shape} dtype {dtype}"
        if not ok:
            received = _show(v)
            raise BoundaryMismatchError(
                f"{where}: value {i} does not match: expected {expected}, received {received}; the sending stage's "
                "output and this stage's input spec disagree (re-split the model, or fix the microbatch size/dtype)",
                index=i, expected=expected, received=received)
