"""``WeightSource``: a model's tensors read by FQN from the files that hold them, opening only those files."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._errors import SHOWN, WeightsError, first_few
from ._files import TensorFile, dtype_kind, open_tensor_file
from ._names import NameResolver

__all__ = ["Expected", "WeightSource"]

Expected = torch.Tensor | tuple[Sequence[int], torch.dtype]
"""What the model expects of a tensor: the tensor itself (a meta tensor will do) or its ``(shape, dtype)``."""


class WeightSource:
    """Weights files (one, a sharded set, or a Stagewise checkpoint) read by the model's FQNs.

    Built by :func:`open_weights`, which knows from an index or a header which file holds each tensor, so that
    :meth:`read` opens only the files holding what it is asked for (recorded in :attr:`files_opened`).
    """

    def __init__(self, path: Path, where: Mapping[str, str], *, folder: Path, listed_in: str | None = None,
                 tied: Iterable[Sequence[str]] = (), sizes: Mapping[str, int] | None = None) -> None:
        self.path = path
        """What :func:`open_weights` was given."""
        self.files_opened: set[str] = set()
        """Basenames of the files :meth:`read` has opened so far."""
        self._where = dict(where)  # key in the files -> file name (relative to ``folder``)
        self._folder = folder
        self._listed_in = listed_in  # the index or manifest that says which file holds which key
        self._sizes = dict(sizes or {})  # file name -> the size the manifest records
        self._tied = {name: [o for o in group if o != name] for group in tied for name in group}
        self._names = NameResolver(self._where)

    def keys(self) -> set[str]:
        """The tensor names in the files (legacy ``gamma``/``beta`` read as ``weight``/``bias``)."""
        return self._names.names()

    def _find(self, fqn: str, aliases: Mapping[str, Sequence[str]]) -> str | None:
        return self._names.find(fqn, [*aliases.get(fqn, ()), *self._tied.get(fqn, ())])

    def _files_text(self) -> str:
        if self._listed_in is None:
            return str(self._folder / next(iter(self._where.values()), self.path.name))
        return f"{self._folder / self._listed_in} (and the {len(set(self._where.values()))} files it lists)"

    def files_holding(self, fqns: Iterable[str], *,
                      aliases: Mapping[str, Sequence[str]] | None = None) -> set[str]:
        """Basenames of the files that hold ``fqns`` (under any of their names): all that reading them may open."""
        keys = (self._find(f, aliases or {}) for f in fqns)
        return {Path(self._where[k]).name for k in keys if k is not None}

    def check_opened_only(self, fqns: Iterable[str], *, aliases: Mapping[str, Sequence[str]] | None = None,
                          who: str = "this process") -> None:
        """Raise RuntimeError when :attr:`files_opened` holds a file beyond those holding ``fqns``: the promise that
        a process reading its own stages' weights opens only their shard files, checked where it reads them."""
        extra = self.files_opened - self.files_holding(fqns, aliases=aliases)
        if extra:
            raise RuntimeError(f"{who} opened weight files that hold none of its tensors: {sorted(extra)[:5]} "
                               "(please report this as a bug)")

    def check_covers(self, fqns: Iterable[str], *, aliases: Mapping[str, Sequence[str]] | None = None) -> None:
        """Raise :class:`WeightsError` listing the FQNs the files hold under no name (a whole-model check)."""
        fqns = list(fqns)
        missing = [f for f in fqns if self._find(f, aliases or {}) is None]
        if missing:
            raise WeightsError(f"{len(missing)} of the model's {len(fqns)} tensors are not in {self._files_text()}: "
                               f"{first_few(missing)}; are these the weights of this model? (a tied weight saved "
                               "under another name needs aliases=)")

    def read(self, wanted: Mapping[str, Expected], *, aliases: Mapping[str, Sequence[str]] | None = None,
             dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of ``wanted`` (FQN -> expected tensor or ``(shape, dtype)``), read from the files.

        Opens only the files holding them and reads tensor by tensor. Floating-point tensors become ``dtype`` when
        given, others (and all without ``dtype``) the expected dtype, converted in one step (bf16 stays bf16).
        ``aliases`` gives a tied tensor's other names (``{"lm_head.weight": ["transformer.wte.weight"]}``). Keys the
        files hold and ``wanted`` lacks are ignored. One :class:`WeightsError` lists every tensor that is missing or
        whose shape or kind of dtype (int, float...) differs.
        """
        expected = {fqn: _shape_dtype(fqn, e) for fqn, e in wanted.items()}
        with contextlib.ExitStack() as stack:
            plan, opened = self._checked(stack, expected, aliases or {})
            out = {}
            for file, names in plan.items():
                for fqn, key in names.items():
                    want = expected[fqn][1]
                    if dtype is not None and want.is_floating_point:
                        want = dtype
                    out[fqn] = opened[file].get(key).to(device=device, dtype=want)
        return {fqn: out[fqn] for fqn in expected}

    def verify(self, wanted: Mapping[str, Expected], *, aliases: Mapping[str, Sequence[str]] | None = None) -> None:
        """What :meth:`read` checks (every name found, shapes and kinds of dtype from the files' headers), reading no
        tensor: the whole model's weights checked in the launching process, before any worker starts."""
        expected = {fqn: _shape_dtype(fqn, e) for fqn, e in wanted.items()}
        with contextlib.ExitStack() as stack:
            self._checked(stack, expected, aliases or {})

    def _checked(self, stack: contextlib.ExitStack, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 aliases: Mapping[str, Sequence[str]]) -> tuple[dict[str, dict[str, str]], dict[str, TensorFile]]:
        """(file -> {fqn: key}, file -> its open handle) for ``expected``; one WeightsError listing every problem."""
        plan: dict[str, dict[str, str]] = {}
        problems = []
        for fqn in expected:
            key = self._find(fqn, aliases)
            if key is None:
                shape, dt = expected[fqn]
                problems.append(f"{fqn}: expected {list(shape)} {dt}, not in the files")
            else:
                plan.setdefault(self._where[key], {})[fqn] = key
        opened = {}
        for file in sorted(plan):
            opened[file] = stack.enter_context(self._open(file))
            self.files_opened.add(Path(file).name)
        for file, names in plan.items():
            problems += _mismatches(opened[file], names, expected, file, self._listed_in)
        if problems:
            raise WeightsError(f"the weights in {self._files_text()} do not fit the model: "
                               f"{len(problems)} of {len(expected)} tensors asked for differ: "
                               + "; ".join(problems[:SHOWN]) + (" ..." if len(problems) > SHOWN else ""))
        return plan, opened

    def _open(self, file: str) -> contextlib.AbstractContextManager[TensorFile]:
        path = self._folder / file
        size = self._sizes.get(file)
        if size is not None and path.is_file() and path.stat().st_size != size:
            raise WeightsError(f"{path} has {path.stat().st_size} bytes but {self._listed_in} records {size}; the "
                               "file was truncated or altered")
        return open_tensor_file(path)

    def __repr__(self) -> str:
        return f"WeightSource({str(self.path)!r}, {len(self._where)} tensors in {len(set(self._where.values()))} files)"


def _shape_dtype(fqn: str, e: Any) -> tuple[tuple[int, ...], torch.dtype]:
    if isinstance(e, torch.Tensor):
        return tuple(e.shape), e.dtype
    if isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], torch.dtype):
        return tuple(e[0]), e[1]
    raise TypeError(f"read(): the expected value of {fqn!r} must be a tensor (a meta tensor will do) or a "
                    f"(shape, dtype) pair, got {type(e).__name__}")


def _mismatches(f: TensorFile, names: Mapping[str, str], expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                file: str, listed_in: str | None) -> list[str]:
    """What differs between the file's tensors and the model's: missing keys, shapes, kinds of dtype."""
    held = f.keys()
    out = []
    for fqn, key in names.items():
        shape, dt = expected[fqn]
        where = f"{file}" if key == fqn else f"{file} as {key!r}"
        if key not in held:
            out.append(f"{fqn}: expected {list(shape)} {dt}, but {file} does not hold {key!r} ({listed_in} says it "
                       "does)")
            continue
        found_shape, found_dtype = f.info(key)
        if found_shape != shape:
            out.append(f"{fqn}: expected shape {list(shape)}, found {list(found_shape)} in {where}")
        elif dtype_kind(found_dtype) != dtype_kind(dt):
            out.append(f"{fqn}: expected {dt} ({dtype_kind(dt)}), found {found_dtype} ({dtype_kind(found_dtype)}) "
                       f"in {where}")
    return out
