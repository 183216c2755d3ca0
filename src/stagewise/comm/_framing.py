"""Tensor framing without pickle: how a list of values becomes int64 headers plus raw tensor bytes, and back.

A message is, in wire order, on one (src, dst, tag) channel:

1. a fixed-size header, ``HEADER_SLOTS`` int64 values (native byte order)::

       [MAGIC, VERSION, src, tag, n_values, desc_len, desc[0], desc[1], ...]

   ``desc`` describes every value in order. A tensor is ``[TENSOR, dtype_code, flags, ndim, *shape]`` (flag bit 0:
   requires_grad); a python scalar carries its value inline: ``[INT, value]``, ``[FLOAT, float64 bits]``,
   ``[BOOL, 0|1]``, ``[NONE]``. Scalars and None therefore cost no extra message. Unused slots are 0.
2. only when ``desc_len`` does not fit in the header: an int64 extension holding the rest of ``desc``.
3. the tensor bytes as uint8 buffers: first one *pack* holding every small tensor (``0 < nbytes <= PACK_LIMIT``)
   back to back, then one buffer per large tensor. Zero-element tensors send nothing.

:class:`DistTransport` sends the header at the start of a first message whose inline area also carries the pack when
it fits, so a typical activation or gradient message is a single transfer (on gloo the first message is only as long
as what it carries; NCCL pads it to a fixed size). Both sides derive the buffer layout from ``desc`` alone
(:func:`buffer_layout`), so the receiver allocates exact buffers before the bytes arrive. Data moves as raw bytes
(``tensor.view(torch.uint8)``), so every dtype in :data:`DTYPE_CODES` works on every backend, whatever dtypes the
backend itself supports. Received tensors are contiguous and own their storage.

The hot path (one message per microbatch, stage and direction) avoids small torch ops: :func:`prepare` only inspects
the values, the header is written with one ``struct.pack_into`` and read with one ``unpack_from``, and small tensors
on the CPU are copied through numpy views of their bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import torch

from ._errors import FramingError

__all__ = [
    "DTYPE_CODES",
    "HEADER_SLOTS",
    "HEADER_STRUCT",
    "PACK_LIMIT",
    "Frame",
    "Prepared",
    "TensorDesc",
    "Value",
    "as_bytes",
    "buffer_layout",
    "encode",
    "materialise",
    "materialise_from",
    "parse_descriptors",
    "parse_header",
    "prepare",
]  # fmt: skip

Value = torch.Tensor | int | float | bool | None
"""What may cross a stage boundary: a tensor or a python scalar or None."""

MAGIC = 0x53544757  # "STGW"
VERSION = 1
HEADER_SLOTS = 64
"""int64 slots in the fixed header (512 bytes): 6 fixed fields + up to 58 descriptor slots inline."""
_FIXED = 6
_INLINE_DESC = HEADER_SLOTS - _FIXED
PACK_LIMIT = 64 * 1024
"""Tensors of at most this many bytes travel together in one pack buffer (one message instead of many)."""
HEADER_STRUCT = struct.Struct(f"={HEADER_SLOTS}q")
"""The header as raw bytes: ``HEADER_STRUCT.pack_into`` / ``unpack_from`` write and read it in one call."""
_I64, _F64 = struct.Struct("=q"), struct.Struct("=d")

# Stable wire codes; never renumber (append new dtypes at the end). Names missing from an older torch are skipped.
DTYPE_CODES: dict[str, int] = {
    "bool": 1, "uint8": 2, "int8": 3, "int16": 4, "int32": 5, "int64": 6,
    "uint16": 7, "uint32": 8, "uint64": 9,
    "float16": 10, "bfloat16": 11, "float32": 12, "float64": 13,
    "complex32": 14, "complex64": 15, "complex128": 16,
    "float8_e4m3fn": 17, "float8_e5m2": 18, "float8_e4m3fnuz": 19, "float8_e5m2fnuz": 20, "float8_e8m0fnu": 21,
    "float4_e2m1fn_x2": 22,
}  # fmt: skip
_DTYPE_TO_CODE: dict[torch.dtype, int] = {
    getattr(torch, name): code for name, code in DTYPE_CODES.items() if hasattr(torch, name)
}
_CODE_TO_DTYPE: dict[int, torch.dtype] = {code: dtype for dtype, code in _DTYPE_TO_CODE.items()}


def _numpy_viewable(name: str) -> bool:
    try:
        torch.empty(1, dtype=getattr(torch, name)).numpy()
    except (AttributeError, TypeError, RuntimeError):  # missing from this torch, or numpy cannot view it
        return False
    return True


_NUMPY_DTYPES = frozenset(getattr(torch, n) for n in ("bool", "uint8", "int8", "int16", "int32", "int64", "uint16",
                          "uint32", "uint64", "float16", "float32", "float64", "complex64", "complex128")
                          if _numpy_viewable(n))
"""Dtypes whose CPU tensors numpy can view: their bytes are copied through numpy, without small torch ops."""


class Kind(enum.IntEnum):
    TENSOR = 1
    INT = 2
    FLOAT = 3
    BOOL = 4
    NONE = 5


_TENSOR, _INT, _FLOAT, _BOOL, _NONE = (int(k) for k in Kind)  # plain ints on the hot path
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclasses.dataclass(frozen=True)
class TensorDesc:
    """A tensor as described in a header: enough to allocate it before its bytes arrive."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


Desc = TensorDesc | int | float | bool | None
"""A parsed descriptor: a :class:`TensorDesc`, or the scalar value itself."""


@dataclasses.dataclass
class Frame:
    """One encoded message, in wire order: header, optional extension, payload buffers (uint8)."""

    header: torch.Tensor
    extension: torch.Tensor | None
    payloads: list[torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor to send, in order."""
        ext = [] if self.extension is None else [self.extension]
        return [self.header, *ext, *self.payloads]


@dataclasses.dataclass(kw_only=True, slots=True)
class Prepared:
    """A message checked and described, before any byte is copied: what :func:`encode` and the transports build on."""

    n_values: int
    """How many values the message holds."""
    desc: list[int]
    """The descriptor slots of every value, in order (see the module docstring)."""
    small: list[torch.Tensor]
    """Tensors that go into the pack (``0 < nbytes <= PACK_LIMIT``), in order; detached, maybe not contiguous."""
    pack_bytes: int
    """Length of the pack: the sum of the small tensors' bytes (0: no pack)."""
    large: list[torch.Tensor]
    """Tensors sent as buffers of their own, in order; detached, maybe not contiguous."""

    def write_header(self, buffer: Any, *, src: int, tag: int) -> None:
        """Write the ``HEADER_SLOTS * 8`` header bytes at the start of ``buffer`` (a writable buffer, e.g. numpy)."""
        desc, n = self.desc, len(self.desc)
        inline = desc[:_INLINE_DESC] if n >= _INLINE_DESC else desc + [0] * (_INLINE_DESC - n)
        HEADER_STRUCT.pack_into(buffer, 0, MAGIC, VERSION, src, tag, self.n_values, n, *inline)

    def extension(self) -> torch.Tensor | None:
        """The descriptor slots that do not fit in the header, as an int64 tensor (None: everything fits)."""
        rest = self.desc[_INLINE_DESC:]
        return torch.tensor(rest, dtype=torch.int64) if rest else None

    def write_pack(self, out: torch.Tensor, offset: int = 0, out_np: np.ndarray | None = None) -> None:
        """Copy the small tensors' bytes back to back into uint8 ``out`` (``out_np``: its numpy view, if at hand),
        starting at byte ``offset``."""
        if out_np is None and out.is_cpu:
            out_np = out.numpy()
        for t in self.small:
            n = t.nbytes
            src = None if out_np is None else _numpy_bytes(t)
            if src is not None:
                out_np[offset : offset + n] = src
            else:
                out[offset : offset + n].copy_(as_bytes(t))
            offset += n


def _numpy_bytes(t: torch.Tensor) -> np.ndarray | None:
    """A flat uint8 numpy view of a contiguous CPU tensor's bytes, or None when numpy cannot view ``t``."""
    if t.is_cpu and t.dtype in _NUMPY_DTYPES and t.is_contiguous():
        return t.numpy().reshape(-1).view(np.uint8)
    return None


def _reject(i: int, v: torch.Tensor) -> NoReturn:
    if v.layout != torch.strided or v.is_quantized or v.is_meta:
        raise ValueError(f"value {i}: only dense (strided) tensors with data can be sent, got layout={v.layout}, "
                         f"dtype={v.dtype}, device={v.device}")
    raise ValueError(f"value {i}: dtype {v.dtype} cannot be sent; supported: {sorted(DTYPE_CODES)}")


def prepare(values: Sequence[Value]) -> Prepared:
    """Check ``values`` and describe them; tensors are detached with lazy conjugate/negative bits resolved."""
    if type(values) not in (list, tuple) and (isinstance(values, (torch.Tensor, str, bytes))
                                              or not isinstance(values, Sequence)):
        raise TypeError(f"values must be a list or tuple of values, got {type(values).__name__}")
    desc: list[int] = []
    small: list[torch.Tensor] = []
    large: list[torch.Tensor] = []
    pack = 0
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            code = _DTYPE_TO_CODE.get(v.dtype)
            if code is None or v.layout != torch.strided or v.is_meta:
                _reject(i, v)
            shape = v.shape
            desc += (_TENSOR, code, int(v.requires_grad), len(shape), *shape)
            nbytes = v.nbytes
            if nbytes:  # zero-element tensors travel as their descriptor only
                t = v.detach()
                if t.is_conj() or t.is_neg():
                    t = t.resolve_conj().resolve_neg()
                if nbytes <= PACK_LIMIT:
                    small.append(t)
                    pack += nbytes
                else:
                    large.append(t)
        elif v is None:
            desc.append(_NONE)
        elif isinstance(v, bool):  # before int: bool is an int subclass
            desc += (_BOOL, int(v))
        elif isinstance(v, int):
            if not _INT64_MIN <= v <= _INT64_MAX:
                raise ValueError(f"value {i}: python int {v} does not fit in int64; send it as a tensor or a float")
            desc += (_INT, int(v))
        elif isinstance(v, float):
            desc += (_FLOAT, _I64.unpack(_F64.pack(v))[0])
        else:
            raise TypeError(f"value {i}: cannot send {type(v).__name__}; values must be torch.Tensor, int, float, "
                            "bool or None")
    return Prepared(n_values=len(values), desc=desc, small=small, pack_bytes=pack, large=large)


def buffer_layout(descs: Sequence[Desc]) -> tuple[list[int], list[tuple[int, int, int] | None], int]:
    """Buffer sizes in wire order (small tensors share buffer 0, the pack, when there is one; each large tensor gets its
    own), ``where[i] = (buffer index, byte offset, nbytes)`` of each value (None: no bytes), and the pack's length."""
    where: list[tuple[int, int, int] | None] = [None] * len(descs)
    large: list[int] = []
    offset = 0
    for i, d in enumerate(descs):
        if type(d) is TensorDesc:
            n = math.prod(d.shape) * d.dtype.itemsize
            if n > PACK_LIMIT:
                large.append(i)
                where[i] = (0, 0, n)  # buffer index fixed below, once the pack's presence is known
            elif n:
                where[i] = (0, offset, n)
                offset += n
    sizes = [offset] if offset else []
    for i in large:
        n = where[i][2]  # type: ignore[index]
        where[i] = (len(sizes), 0, n)
        sizes.append(n)
    return sizes, where, offset


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor (a view when contiguous, else a contiguous copy)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def encode(values: Sequence[Value], *, src: int, tag: int, device: torch.device | None = None,
           copy: bool = False) -> Frame:
    """Encode ``values`` as a :class:`Frame` whose tensors live on ``device`` (default: where each tensor is).

    Non-contiguous tensors (e.g. an ``expand``-ed mask with stride 0) are made contiguous. With ``copy=True`` the frame
    never aliases the caller's tensors (a snapshot); otherwise large contiguous tensors may be sent from their memory.
    """
    p = prepare(values)
    header = torch.empty(HEADER_SLOTS, dtype=torch.int64)
    p.write_header(header.numpy(), src=src, tag=tag)
    extension = p.extension()
    payloads: list[torch.Tensor] = []
    if p.small:  # a fresh buffer: a snapshot either way
        pack_device = device if device is not None else p.small[0].device
        payloads.append(torch.empty(p.pack_bytes, dtype=torch.uint8, device=pack_device))
        p.write_pack(payloads[0])
    for t in p.large:
        if copy or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        payloads.append(as_bytes(t).to(device if device is not None else t.device))
    if device is not None:
        header = header.to(device)
        extension = None if extension is None else extension.to(device)
    return Frame(header=header, extension=extension, payloads=payloads)


def parse_header(header: torch.Tensor | Sequence[int], *, src: int, tag: int) -> tuple[int, int]:
    """Check a received header (the int64 tensor, or its ``HEADER_SLOTS`` values); return ``(n_values, ext_len)``."""
    h = header.tolist() if isinstance(header, torch.Tensor) else header
    if len(h) != HEADER_SLOTS or h[0] != MAGIC:
        raise FramingError(f"message from rank {src} with tag {tag} is not a Stagewise frame (first slots "
                           f"{list(h[:4])}); is something else sending on this process group and tag?")
    if h[1] != VERSION:
        raise FramingError(f"message from rank {src} with tag {tag} uses frame version {h[1]}, this side speaks "
                           f"version {VERSION}; run the same stagewise version on every rank")
    if h[2] != src or h[3] != tag:
        raise FramingError(
            f"waiting for a message from rank {src} with tag {tag} but received one sent by rank {h[2]} with tag "
            f"{h[3]}; backends that ignore tags (NCCL) need messages between two ranks received in the order sent")
    return h[4], max(0, h[5] - _INLINE_DESC)


def parse_descriptors(header: torch.Tensor | Sequence[int],
                      extension: torch.Tensor | Sequence[int] | None) -> list[Desc]:
    """Decode the per-value descriptors of a header already checked by :func:`parse_header` (tensors or values)."""
    h = header.tolist() if isinstance(header, torch.Tensor) else header
    if isinstance(extension, torch.Tensor):
        extension = extension.tolist()
    n_values, desc_len = h[4], h[5]
    desc = (h[_FIXED:] if not extension else [*h[_FIXED:], *extension])[:desc_len]
    out: list[Desc] = []
    pos = 0
    try:
        for _ in range(n_values):
            kind = desc[pos]
            if kind == _TENSOR:
                code, flags, ndim = desc[pos + 1 : pos + 4]
                dtype = _CODE_TO_DTYPE.get(code)
                if dtype is None:
                    raise FramingError(f"unknown dtype code {code}; the sender runs a newer torch or stagewise")
                out.append(TensorDesc(dtype, tuple(desc[pos + 4 : pos + 4 + ndim]), bool(flags & 1)))
                pos += 4 + ndim
            elif kind == _NONE:
                out.append(None)
                pos += 1
            elif kind == _INT or kind == _BOOL or kind == _FLOAT:
                raw = desc[pos + 1]
                out.append(int(raw) if kind == _INT else bool(raw) if kind == _BOOL else _F64.unpack(_I64.pack(raw))[0])
                pos += 2
            else:
                raise ValueError(f"{kind} is not a valid Kind")
    except (ValueError, IndexError, struct.error) as exc:
        if isinstance(exc, FramingError):
            raise
        raise FramingError(f"corrupt frame descriptor at slot {pos}: {exc}") from exc
    if pos != desc_len:
        raise FramingError(f"corrupt frame: descriptors use {pos} slots, header says {desc_len}")
    return out


def materialise(descs: Sequence[Desc], payloads: Sequence[torch.Tensor], device: torch.device) -> list[Value]:
    """Turn descriptors plus received buffers into values; every tensor is contiguous and owns its storage.

    Small tensors are copied out of the pack (so the pack buffer may be reused afterwards); a large tensor is a view
    of its own buffer.
    """
    sizes, where, pack_bytes = buffer_layout(descs)
    if len(payloads) != len(sizes) or any(p.numel() != n for p, n in zip(payloads, sizes)):
        raise FramingError(f"payload sizes {[p.numel() for p in payloads]} do not match the header's {sizes}")
    pack = payloads[0] if pack_bytes else None
    return materialise_from(descs, where, pack=pack, large=payloads[1:] if pack_bytes else payloads, device=device)


def materialise_from(descs: Sequence[Desc], where: Sequence[tuple[int, int, int] | None], *,
                     pack: torch.Tensor | None, large: Sequence[torch.Tensor], device: torch.device) -> list[Value]:
    """:func:`materialise` for buffers already checked against ``buffer_layout(descs)`` (``where``): ``pack`` holds
    exactly the small tensors' bytes (None when there are none; it may be a view into a larger message, as a
    transport's first message carries it after the header), ``large`` the large tensors' own buffers in wire order.
    """
    shift = 0 if pack is None else 1  # buffer index in ``where`` -> index in ``large``: the pack is buffer 0
    pack_np = pack.numpy() if pack is not None and pack.is_cpu else None
    values: list[Value] = []
    for d, w in zip(descs, where):
        if type(d) is not TensorDesc:
            values.append(d)
            continue
        if w is None:  # zero elements: nothing travelled
            t = torch.empty(d.shape, dtype=d.dtype, device=device)
        elif w[2] > PACK_LIMIT:  # its own buffer
            t = large[w[0] - shift].view(d.dtype).reshape(d.shape)
        else:  # a slice of the pack: give it its own storage
            start, end = w[1], w[1] + w[2]
            if pack_np is not None and d.dtype in _NUMPY_DTYPES:  # copy through numpy: no torch slicing ops
                t = torch.empty(d.shape, dtype=d.dtype)
                t.numpy().reshape(-1).view(np.uint8)[:] = pack_np[start:end]
            else:
                t = pack[start:end].clone().view(d.dtype).reshape(d.shape)  # type: ignore[index]
        if d.requires_grad:
            t.requires_grad_(True)
        values.append(t)
    return values
