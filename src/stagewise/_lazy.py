"""Lazy package exports (PEP 562): a package lists where each public name lives and imports that module on first use.

So ``stagewise --help`` (which imports ``stagewise``, ``stagewise.train`` and ``stagewise.serve`` to build its
parsers from their config classes) answers without importing torch, FastAPI or safetensors. ``__all__`` stays the
package's public surface; ``from stagewise.serve import X`` and ``stagewise.serve.X`` behave as with eager imports.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any

__all__ = ["lazy_exports"]


class _LazyPackage(types.ModuleType):
    """A package whose exported name may equal a subpackage's (``stagewise.split``, the function): the import
    system records an imported subpackage as an attribute of its parent, which must not hide the export."""

    _lazy_sources: Mapping[str, str]

    def __setattr__(self, name: str, value: Any) -> None:
        sources = self.__dict__.get("_lazy_sources", {})
        if isinstance(value, types.ModuleType) and name in sources and value.__name__ == f"{self.__name__}.{name}":
            return  # the export of that name (loaded on first use) wins, as it did with eager imports
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        source = self.__dict__["_lazy_sources"].get(name)
        if source is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source, self.__name__), name)
        self.__dict__[name] = value  # later reads are plain attribute reads
        return value

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *self.__dict__["_lazy_sources"]})


def lazy_exports(package: str, sources: Mapping[str, str]) -> list[str]:
    """Make each name of ``sources`` (name -> relative module, e.g. ``{"Trainer": "._trainer"}``) an attribute of
    ``package`` loaded on first use; returns the names, for ``__all__``."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_lazy_sources"] = dict(sources)
    return sorted(sources)
