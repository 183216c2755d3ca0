"""Which name in the files holds a model's tensor: the FQN itself, a tied alias, or the FQN as Hugging Face files
spell it (the model's base prefix present or absent, legacy LayerNorm ``gamma``/``beta``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["NameResolver", "modern_name"]

_LEGACY = {"gamma": "weight", "beta": "bias"}


def modern_name(key: str) -> str:
    """``encoder.ln.gamma`` -> ``encoder.ln.weight``, ``...beta`` -> ``...bias`` (TF-era LayerNorm names)."""
    head, dot, last = key.rpartition(".")
    return f"{head}{dot}{_LEGACY[last]}" if last in _LEGACY else key


class NameResolver:
    """Finds the key in the files that holds a model FQN.

    In order: the FQN or one of its aliases as the files name it (legacy names read as modern ones); then the same
    with the model's first component removed (the files were saved from the base model: ``layers.0...`` for
    ``model.layers.0...``) or with one leading component added (the files have a prefix the model lacks:
    ``transformer.h.0...`` for ``h.0...``; used only when exactly one key has that suffix).
    """

    def __init__(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._by_name: dict[str, str] = {k: k for k in keys}
        for k in keys:
            self._by_name.setdefault(modern_name(k), k)
        self._by_suffix: dict[str, str | None] = {}
        for name, key in self._by_name.items():
            _, dot, rest = name.partition(".")
            if dot:
                self._by_suffix[rest] = None if rest in self._by_suffix else key  # None: two keys share it

    def names(self) -> set[str]:
        """The file keys, legacy names read as modern ones."""
        return {modern_name(k) for k in self._by_name.values()}

    def find(self, fqn: str, aliases: Sequence[str] = ()) -> str | None:
        """The file key holding ``fqn`` (or a tied alias of it), or None."""
        candidates = (fqn, *aliases)
        for name in candidates:
            if name in self._by_name:
                return self._by_name[name]
        for name in candidates:
            _, dot, rest = name.partition(".")
            if dot and rest in self._by_name:
                return self._by_name[rest]
            if self._by_suffix.get(name):
                return self._by_suffix[name]
        return None
