"""Tensor framing without pickle: how a list of values becomes int64 headers plus raw tensor bytes, and back.

A message is, in wire order, on one (src, dst, tag) channel:

1. a fixed-size header, ``HEADER_SLOTS`` int64 values::

       [MAGIC, VERSION, src, tag, n_values, desc_len, desc[0], desc[1], ...]

   ``desc`` describes every value in order. A tensor is ``[TENSOR, dtype_code, flags, ndim, *shape]`` (flag bit 0:
   requires_grad); a python scalar carries its value inline: ``[INT, value]``, ``[FLOAT, float64 bits]``,
   ``[BOOL, 0|1]``, ``[NONE]``. Scalars and None therefore cost no extra message.
2. only when ``desc_len`` does not fit in the header: an int64 extension holding the rest of ``desc``.
3. the tensor bytes as uint8 buffers: first one *pack* holding every small tensor (``0 < nbytes <= PACK_LIMIT``)
   back to back, then one buffer per large tensor. Zero-element tensors send nothing.

:class:`DistTransport` sends the header inside a fixed-size first message whose inline area also carries the pack
when it fits, so a typical activation or gradient message is a single transfer. Both sides derive the buffer layout
from ``desc`` alone (:func:`payload_layout`), so the receiver allocates exact
buffers before the bytes arrive. Data moves as raw bytes (``tensor.view(torch.uint8)``), so every dtype in
:data:`DTYPE_CODES` works on every backend, whatever dtypes the backend itself supports. Received tensors are
contiguous and own their storage.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
from collections.abc import Sequence
from typing import Any, Union

import torch

from ._errors import BoundaryMismatchError, FramingError

__all__ = [
    "Value",
    "DTYPE_CODES",
    "HEADER_SLOTS",
    "PACK_LIMIT",
    "Frame",
    "TensorDesc",
    "encode",
    "parse_header",
    "parse_descriptors",
    "payload_layout",
    "alloc_payloads",
    "materialise",
    "check_expect",
]

Value = Union[torch.Tensor, int, float, bool, None]
"""What may cross a stage boundary: a tensor or a python scalar or None."""

MAGIC = 0x53544757  # "STGW"
VERSION = 1
HEADER_SLOTS = 64
"""int64 slots in the fixed header (512 bytes): 6 fixed fields + up to 58 descriptor slots inline."""
_FIXED = 6
PACK_LIMIT = 64 * 1024
"""Tensors of at most this many bytes travel together in one pack buffer (one message instead of many)."""

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


class Kind(enum.IntEnum):
    TENSOR = 1
    INT = 2
    FLOAT = 3
    BOOL = 4
    NONE = 5


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


Desc = Union[TensorDesc, int, float, bool, None]
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


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def _describe(i: int, v: Any) -> tuple[list[int], torch.Tensor | None]:
    """The descriptor slots for value ``i`` and, for a tensor, the detached, resolved tensor to send."""
    if isinstance(v, torch.Tensor):
        if v.layout != torch.strided or v.is_quantized or v.is_meta:
            raise ValueError(f"value {i}: only dense (strided) tensors with data can be sent, got layout={v.layout}, "
                             f"dtype={v.dtype}, device={v.device}")
        code = _DTYPE_TO_CODE.get(v.dtype)
        if code is None:
            raise ValueError(f"value {i}: dtype {v.dtype} cannot be sent; supported: {sorted(DTYPE_CODES)}")
        t = v.detach().resolve_conj().resolve_neg()
        return [Kind.TENSOR, code, int(v.requires_grad), v.dim(), *v.shape], t
    if v is None:
        return [Kind.NONE], None
    if isinstance(v, bool):  # before int: bool is an int subclass
        return [Kind.BOOL, int(v)], None
    if isinstance(v, int):
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise ValueError(f"value {i}: python int {v} does not fit in int64; send it as a tensor or a float")
        return [Kind.INT, v], None
    if isinstance(v, float):
        return [Kind.FLOAT, _float_bits(v)], None
    raise TypeError(f"value {i}: cannot send {type(v).__name__}; values must be torch.Tensor, int, float, bool or None")


def _is_small(nbytes: int) -> bool:
    return 0 < nbytes <= PACK_LIMIT


def payload_layout(descs: Sequence[Desc]) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Buffer sizes in wire order, and for each value its ``(buffer index, byte offset)`` (None: no bytes).

    Small tensors share buffer 0 (the pack) when there is at least one; each large tensor gets its own buffer.
    """
    sizes: list[int] = []
    where: list[tuple[int, int] | None] = [None] * len(descs)
    small = [i for i, d in enumerate(descs) if isinstance(d, TensorDesc) and _is_small(d.nbytes)]
    if small:
        offset = 0
        for i in small:
            where[i] = (0, offset)
            offset += descs[i].nbytes  # type: ignore[union-attr]
        sizes.append(offset)
    for i, d in enumerate(descs):
        if isinstance(d, TensorDesc) and d.nbytes > PACK_LIMIT:  # zero-byte tensors get no buffer
            where[i] = (len(sizes), 0)
            sizes.append(d.nbytes)
    return sizes, where


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (no copy)."""
    return t.reshape(-1).view(torch.uint8)


def encode(values: Sequence[Value], *, src: int, tag: int, device: torch.device | None = None,
           copy: bool = False) -> Frame:
    """Encode ``values`` as a :class:`Frame` whose tensors live on ``device`` (default: where each tensor is).

    Non-contiguous tensors (e.g. an ``expand``-ed mask with stride 0) are made contiguous. With ``copy=True`` the frame
    never aliases the caller's tensors (a snapshot); otherwise large contiguous tensors may be sent from their memory.
    """
    if isinstance(values, (torch.Tensor, str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"values must be a list or tuple of values, got {type(values).__name__}")
    desc: list[int] = []
    tensors: list[torch.Tensor] = []
    for i, v in enumerate(values):
        slots, t = _describe(i, v)
        desc.extend(int(s) for s in slots)
        if t is not None and t.numel() > 0:  # zero-element tensors travel as their descriptor only
            tensors.append(t)
    pack: list[torch.Tensor] = []
    large: list[torch.Tensor] = []
    for t in tensors:  # same order and split as payload_layout()
        if _is_small(t.nbytes):
            dev = device if device is not None else pack[0].device if pack else t.device
            pack.append(_as_bytes(t.contiguous()).to(dev))  # torch.cat below copies: a snapshot either way
        else:
            if copy or not t.is_contiguous():
                t = t.clone(memory_format=torch.contiguous_format)
            large.append(_as_bytes(t).to(device if device is not None else t.device))
    payloads = ([torch.cat(pack)] if pack else []) + large
    inline = desc[: HEADER_SLOTS - _FIXED]
    fixed = [MAGIC, VERSION, src, tag, len(values), len(desc)]
    header = torch.tensor(fixed + inline + [0] * (HEADER_SLOTS - _FIXED - len(inline)), dtype=torch.int64)
    rest = desc[len(inline) :]
    extension = torch.tensor(rest, dtype=torch.int64) if rest else None
    if device is not None:
        header = header.to(device)
        extension = None if extension is None else extension.to(device)
    return Frame(header=header, extension=extension, payloads=payloads)


def parse_header(header: torch.Tensor, *, src: int, tag: int) -> tuple[int, int]:
    """Check a received header; return ``(n_values, extension_len)``."""
    h = header.tolist()
    if len(h) != HEADER_SLOTS or h[0] != MAGIC:
        raise FramingError(f"message from rank {src} with tag {tag} is not a Stagewise frame (first slots {h[:4]}); "
                           "is something else sending on this process group and tag?")
    if h[1] != VERSION:
        raise FramingError(f"message from rank {src} with tag {tag} uses frame version {h[1]}, this side speaks "
                           f"version {VERSION}; run the same stagewise version on every rank")
    if h[2] != src or h[3] != tag:
        raise FramingError(
            f"waiting for a message from rank {src} with tag {tag} but received one sent by rank {h[2]} with tag "
            f"{h[3]}; backends that ignore tags (NCCL) need messages between two ranks received in the order sent")
    n_values, desc_len = h[4], h[5]
    return n_values, max(0, desc_len - (HEADER_SLOTS - _FIXED))


def parse_descriptors(header: torch.Tensor, extension: torch.Tensor | None) -> list[Desc]:
    """Decode the per-value descriptors of a header already checked by :func:`parse_header`."""
    h = header.tolist()
    n_values, desc_len = h[4], h[5]
    desc = h[_FIXED:HEADER_SLOTS] + ([] if extension is None else extension.tolist())
    desc = desc[:desc_len]
    out: list[Desc] = []
    pos = 0
    try:
        for _ in range(n_values):
            kind = Kind(desc[pos])
            if kind is Kind.TENSOR:
                code, flags, ndim = desc[pos + 1 : pos + 4]
                shape = tuple(desc[pos + 4 : pos + 4 + ndim])
                if code not in _CODE_TO_DTYPE:
                    raise FramingError(f"unknown dtype code {code}; the sender runs a newer torch or stagewise")
                out.append(TensorDesc(_CODE_TO_DTYPE[code], shape, bool(flags & 1)))
                pos += 4 + ndim
            elif kind is Kind.NONE:
                out.append(None)
                pos += 1
            else:
                raw = desc[pos + 1]
                out.append(int(raw) if kind is Kind.INT else bool(raw) if kind is Kind.BOOL else _bits_float(raw))
                pos += 2
    except (ValueError, IndexError) as exc:
        if isinstance(exc, FramingError):
            raise
        raise FramingError(f"corrupt frame descriptor at slot {pos}: {exc}") from exc
    if pos != desc_len:
        raise FramingError(f"corrupt frame: descriptors use {pos} slots, header says {desc_len}")
    return out


def alloc_payloads(descs: Sequence[Desc], device: torch.device) -> list[torch.Tensor]:
    """Empty uint8 buffers, in wire order, to receive the bytes of ``descs`` into."""
    sizes, _ = payload_layout(descs)
    return [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]


def materialise(descs: Sequence[Desc], payloads: Sequence[torch.Tensor], device: torch.device) -> list[Value]:
    """Turn descriptors plus received buffers into values; every tensor is contiguous and owns its storage."""
    sizes, where = payload_layout(descs)
    if [p.numel() for p in payloads] != sizes:
        raise FramingError(f"payload sizes {[p.numel() for p in payloads]} do not match the header's {sizes}")
    values: list[Value] = []
    for d, w in zip(descs, where):
        if not isinstance(d, TensorDesc):
            values.append(d)
            continue
        if w is None:  # zero elements: nothing travelled
            t = torch.empty(d.shape, dtype=d.dtype, device=device)
        else:
            buf_index, offset = w
            raw = payloads[buf_index][offset : offset + d.nbytes]
            if _is_small(d.nbytes):
                raw = raw.clone()  # a slice of the pack: give it its own storage
            t = raw.view(d.dtype).reshape(d.shape)
        if d.requires_grad:
            t.requires_grad_(True)
        values.append(t)
    return values


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
