"""What a model factory returns, and how a ``MODEL`` string on the command line finds the factory.

A factory is any callable taking no arguments (or only keyword arguments with defaults) that returns either a
:class:`ModelSpec` or a ``(model, inputs)`` pair, where ``inputs`` is a tuple of positional arguments, a dict of keyword
arguments, or a single tensor. ``MODEL`` strings are ``path/to/file.py:factory`` or ``package.module:factory``, or
the path of a Hugging Face model folder (a directory with ``config.json``: :func:`stagewise.weights.hf_folder_spec`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import itertools
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["SAMPLE_FORMS", "ModelSpec", "as_model_spec", "import_model_code", "load_model_spec", "portable_model",
           "sample_to_call", "training_data"]


@dataclasses.dataclass(kw_only=True)
class ModelSpec:
    """A model together with example inputs (and, for training, how to score and feed it)."""

    model: nn.Module
    """The unmodified model to split."""
    args: tuple[Any, ...] = ()
    """Example positional inputs: ``model(*args, **kwargs)`` must run."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Example keyword inputs."""
    loss: Callable[..., torch.Tensor] | None = None
    """``loss(output, *targets) -> scalar`` for training; None when the model's own output holds the loss."""
    dataset: Callable[[], Any] | None = None
    """Returns the training samples: a map-style dataset, a DataLoader or an iterable of ``(x, y)``,
    ``((x1, x2), (y1, y2))`` or ``{"input_ids": ..., "labels": ...}`` samples (see :func:`training_data`)."""
    name: str = "model"
    """Name used by logs and by the serving endpoint."""
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    """Scores a trained model on held-out data (e.g. ``{"accuracy": 0.97}``); run after training."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"ModelSpec.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.args, tuple):
            raise TypeError(f"ModelSpec.args must be a tuple of example inputs, got {type(self.args).__name__}")


def sample_to_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A (batched) sample's inputs as ``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs), {}
    return (inputs,), {}


SAMPLE_FORMS = ("a training sample is (inputs, targets): (x, y) tensors as from TensorDataset(X, Y), "
                "((x1, x2), (y1, y2)) for several inputs or targets, or a dict of named inputs with 'labels' "
                "(Hugging Face style); the dataset is map-style, a DataLoader, or an iterable of such samples")
"""The accepted sample forms, quoted by every error about a sample."""


class _Samples(Dataset):
    """A map-style view of the user's samples as ``(inputs, targets)`` with ``targets`` always a tuple, so that
    ``loss(output, *targets)`` gets whole tensors (a bare target tensor would be unpacked row by row)."""

    def __init__(self, data: Any, *, own_loss: bool) -> None:
        self.data = data
        self.own_loss = own_loss

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, tuple[Any, ...]]:
        sample = self.data[i]
        if isinstance(sample, Mapping):
            named = dict(sample)
            if self.own_loss or "labels" not in named:
                return named, ()  # the model reads the labels itself (Hugging Face) or needs none
            labels = named.pop("labels")
            return named, (labels,)
        if isinstance(sample, (tuple, list)) and len(sample) == 2:
            inputs, targets = sample
            return inputs, tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
        what = f"a {len(sample)}-tuple" if isinstance(sample, (tuple, list)) else f"a {type(sample).__name__}"
        raise ValueError(f"dataset sample {i} is {what}; {SAMPLE_FORMS}")


def training_data(spec: ModelSpec, *, limit: int | None = None) -> Dataset:
    """``spec.dataset()`` as a map-style dataset of ``(inputs, targets_tuple)`` samples, checked on its first sample.

    A DataLoader contributes its dataset (stagewise draws its own seeded batches of the global batch size); an
    iterable without ``__getitem__`` is read into memory, at most ``limit`` samples of it.
    """
    if spec.dataset is None:
        raise ValueError(f"model {spec.name!r} has no dataset; training needs ModelSpec.dataset ({SAMPLE_FORMS})")
    data = spec.dataset()
    if isinstance(data, DataLoader):
        data = data.dataset
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        if not hasattr(data, "__iter__"):
            raise ValueError(f"ModelSpec.dataset() returned a {type(data).__name__}; {SAMPLE_FORMS}")
        data = list(itertools.islice(data, limit))
    samples = _Samples(data, own_loss=spec.loss is None)
    if len(samples) == 0:
        raise ValueError(f"model {spec.name!r}: the dataset is empty")
    samples[0]  # noqa: B018 (a wrong form fails here, once, with the forms it could take)
    return samples


def as_model_spec(value: Any, *, name: str = "model") -> ModelSpec:
    """Normalise what a factory returned into a :class:`ModelSpec`."""
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], nn.Module):
        model, inputs = value
        if isinstance(inputs, Mapping):
            return ModelSpec(model=model, kwargs=dict(inputs), name=name)
        if isinstance(inputs, tuple):
            return ModelSpec(model=model, args=inputs, name=name)
        return ModelSpec(model=model, args=(inputs,), name=name)
    raise TypeError(
        "a model factory must return a stagewise.ModelSpec or a (model, inputs) pair where inputs is a tuple, a dict "
        f"or a tensor; got {type(value).__name__}"
    )


def _is_file_target(where: str) -> bool:
    return where.endswith(".py") or "/" in where


HF_FOLDER_FACTORY = "stagewise.weights:hf_folder_spec"
"""The factory a Hugging Face folder as ``MODEL`` stands for (imported by name: ``weights`` imports this module)."""


def _is_hf_folder_target(target: str) -> bool:
    return (Path(target) / "config.json").is_file()


def portable_model(target: str) -> str:
    """``target`` as it finds the same factory from any directory: a ``file.py:factory`` path or a Hugging Face
    folder made absolute (what a checkpoint records, so ``stagewise serve /abs/ckpt`` works from elsewhere); a module
    path is left as it is."""
    if _is_hf_folder_target(target):
        return str(Path(target).resolve())
    where, sep, attr = target.rpartition(":")
    if not sep or not _is_file_target(where):
        return target
    return f"{Path(where).resolve()}:{attr}"


def _import_factory(target: str) -> Callable[..., Any]:
    if ":" not in target:
        raise ValueError(f"MODEL must look like 'file.py:factory' or 'package.module:factory', got {target!r}")
    where, _, attr = target.rpartition(":")
    if _is_file_target(where):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"model file {where!r} does not exist (MODEL={target!r})")
        mod_name = f"_stagewise_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise ValueError(f"cannot import module {where!r} named by MODEL={target!r}: {exc}") from exc
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{where!r} has no attribute {attr!r} (MODEL={target!r})") from None
    if not callable(factory):
        raise ValueError(f"{target!r} is not callable; MODEL must name a factory function")
    return factory


def import_model_code(target: str) -> list[str]:
    """Import the module of MODEL's factory without calling it: what a process that gets its stages as data needs
    before it rebuilds them (the module may register custom operators the graphs call, and define the classes of the
    model's output). Returns that module's name (none for a folder: it imports nothing)."""
    if _is_hf_folder_target(target):
        return []
    return [_import_factory(target).__module__]


def load_model_spec(target: str, **factory_kwargs: Any) -> ModelSpec:
    """Import ``target`` (``file.py:factory`` or ``package.module:factory``) and call the factory; a Hugging Face
    model folder gives ``hf_folder_spec(folder)`` (its model built from ``config.json``, random weights)."""
    if _is_hf_folder_target(target):
        return _import_factory(HF_FOLDER_FACTORY)(target, **factory_kwargs)
    factory = _import_factory(target)
    spec = as_model_spec(factory(**factory_kwargs), name=target.rpartition(":")[2])
    return spec
