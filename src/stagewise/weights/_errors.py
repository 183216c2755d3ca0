"""``WeightsError`` and how its messages list names (the first few, then a count)."""

from __future__ import annotations

from collections.abc import Iterable

from .._errors import StagewiseError

__all__ = ["SHOWN", "WeightsError", "first_few"]

SHOWN = 5
"""How many names a message lists before it counts the rest."""


class WeightsError(StagewiseError, ValueError):
    """Weights files cannot give what was asked: a path of no accepted kind, tensors missing, shapes or dtypes that do
    not match the model. The message names the file(s) and the first few tensors."""


def first_few(items: Iterable[str], n: int = SHOWN) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``."""
    items = list(items)
    shown = ", ".join(items[:n])
    return f"{shown} and {len(items) - n} more" if len(items) > n else shown
