"""One weights file opened for reading tensors by name: safetensors (memory-mapped, one tensor at a time) or a
``torch.save``'d state_dict (``torch.load(weights_only=True, mmap=True)``: no code is unpickled, nothing is read until
a tensor is asked for)."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from ._errors import WeightsError, first_few

__all__ = ["TensorFile", "dtype_kind", "file_keys", "open_tensor_file"]


def dtype_kind(dtype: torch.dtype | str) -> str:
    """``float``, ``int``, ``bool`` or ``complex``: what a value means, whatever its width (a torch dtype or a
    safetensors dtype name such as ``BF16``, ``I64``, ``BOOL``)."""
    if isinstance(dtype, str):
        if dtype == "BOOL":
            return "bool"
        if dtype.startswith("C"):
            return "complex"
        return "float" if dtype.startswith(("F", "BF")) else "int"
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


class TensorFile(Protocol):
    """An open weights file."""

    def keys(self) -> set[str]: ...

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """The tensor's shape and dtype (a torch dtype, or a safetensors name such as ``BF16``), without reading its
        values."""
        ...

    def get(self, key: str) -> torch.Tensor:
        """The tensor, in memory of its own (not a view of the file)."""
        ...


class _Safetensors:
    def __init__(self, handle: object) -> None:
        self._f = handle

    def keys(self) -> set[str]:
        return set(self._f.keys())

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        view = self._f.get_slice(key)
        return tuple(view.get_shape()), view.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)


class _StateDict:
    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> set[str]:
        return set(self._tensors)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._tensors[key]
        return tuple(t.shape), t.dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].clone()  # out of the memory map: the caller may keep it after the file is closed


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"{path}: cannot be read as a state_dict with torch.load(weights_only=True, mmap=True) "
                           f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); save it with "
                           "torch.save(model.state_dict(), path) or as safetensors") from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = f"a dict with keys {first_few(map(str, obj))}" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(f"{path}: holds {what}, not a flat {{name: tensor}} state_dict; save "
                           "model.state_dict() itself")
    return {str(k): v for k, v in obj.items()}


@contextlib.contextmanager
def open_tensor_file(path: Path) -> Iterator[TensorFile]:
    """Open ``path`` (``.safetensors``, else a state_dict file) for reading tensors by name."""
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # the Rust reader raises its own SafetensorError for a damaged header
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
        with handle as f:
            yield _Safetensors(f)
    else:
        yield _StateDict(_load_state_dict(path))


def file_keys(path: Path) -> set[str]:
    """The tensor names in one file (its header only, for safetensors)."""
    with open_tensor_file(path) as f:
        return f.keys()
