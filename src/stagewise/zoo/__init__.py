"""The Stagewise model zoo: small models built from code with deterministic random weights.

Each entry is a factory (keyword arguments only, all defaulted) returning a :class:`stagewise.ModelSpec` with example
inputs (batch 4 on dim 0), a loss (or None when the model's output holds it) and a training dataset. Use them by name::

    from stagewise import zoo
    spec = zoo.get("tiny_gpt")()

or on the command line as ``stagewise.zoo.basic:mlp``, ``stagewise.zoo.gpt:tiny_gpt``, ``stagewise.zoo.hf:llama``.
The Hugging Face models are registered as ``hf_<name>`` in :data:`ALL_MODELS`; they need ``transformers`` only when
called.
"""

from __future__ import annotations

from collections.abc import Callable

from stagewise._spec import ModelSpec
from stagewise.zoo.basic import BASIC_MODELS, Samples
from stagewise.zoo.gpt import tiny_gpt
from stagewise.zoo.hf import HF_MODELS

__all__ = ["ALL_MODELS", "BASIC_MODELS", "HF_MODELS", "Samples", "get"]

ALL_MODELS: dict[str, Callable[..., ModelSpec]] = {
    **BASIC_MODELS,
    "tiny_gpt": tiny_gpt,
    **{f"hf_{name}": factory for name, factory in HF_MODELS.items()},
}
"""Every zoo model by name: the plain-PyTorch ones, ``tiny_gpt`` and ``hf_<architecture>``."""


def get(name: str) -> Callable[..., ModelSpec]:
    """The factory registered under ``name`` in :data:`ALL_MODELS`."""
    try:
        return ALL_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; choose one of: {', '.join(ALL_MODELS)}") from None
