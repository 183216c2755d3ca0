"""The bytes on disk: the directory layout (from ``_checkpoint_layout``), safetensors headers, reading back into
fresh tensors, durable renames.

A checkpoint is a directory ``step-{k:08d}/`` holding, per part (``stage0``, ``stage1``...),
``{part}.model.safetensors`` and ``{part}.optim.safetensors``, plus ``manifest.json`` (see ``_save``). Tensor files
are standard safetensors (8-byte little-endian header length, a JSON header, the raw bytes), written by ``_write``
and read here into fresh tensors, hashing on the way when asked. Nothing here ever unpickles.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .._checkpoint_layout import (
    FORMAT,
    LATEST,
    MANIFEST,
    STEP_RE,
    TMP_RE,
    VERSION,
    latest_checkpoint,
    list_checkpoints,
    step_name,
)
from .._errors import StagewiseError

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "STEP_RE",
    "TMP_RE",
    "VERSION",
    "CheckpointError",
    "canonical_checksum",
    "chunks",
    "fsync_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "raw_bytes",
    "read_header",
    "read_tensors",
    "safetensors_header",
    "sha256_file",
    "step_name",
    "write_json_durable",
    "write_text_durable",
]

CHUNK = 8 << 20
"""Bytes per read/hash call: big enough that thread hand-offs cost nothing, small enough to stay in cache."""

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
TORCH_DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()}


class CheckpointError(StagewiseError):
    """A checkpoint is missing, incomplete, or does not match its manifest (a file truncated, altered or absent)."""


# --- safetensors layout ------------------------------------------------------------------------------------------


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview, without a copy when it is already a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The safetensors header, and the order the tensors' bytes follow it in (widest dtypes first keeps alignment)."""
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())  # stable: same-width tensors keep their order
    entries: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store; convert it first")
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned, as the safetensors library does
    return struct.pack("<Q", len(text)) + text, order


def chunks(views: Iterable[memoryview], size: int | None = None) -> Iterator[memoryview]:
    """The views cut into pieces of at most ``size`` bytes (default :data:`CHUNK`), in order."""
    size = size or CHUNK
    for mv in views:
        for start in range(0, len(mv), size):
            yield mv[start:start + size]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_durable(path: Path, data: Any) -> None:
    """Write JSON next to ``path``, fsync it, then atomically rename it over ``path``."""
    write_text_durable(path, json.dumps(data, indent=1))


def canonical_checksum(body: Mapping[str, Any]) -> str:
    """sha256 of ``body`` as canonical JSON: what the manifest records about itself, checked after parsing."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --- reading ----------------------------------------------------------------------------------------------------


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The parsed safetensors header of ``path`` and the byte offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > os.fstat(f.fileno()).st_size:
            raise CheckpointError(f"{path}: header length {n} is past the end of the file; not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _readinto_exact(f: Any, mv: memoryview, path: Path) -> None:
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])
        if not n:
            raise CheckpointError(f"{path}: ended early (truncated)")
        got += n


def _hashed_reads(f: Any, targets: Iterable[memoryview], h: Any, path: Path) -> None:
    """Read into each target in turn while a helper thread hashes the previous one."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-hash") as pool:
        pending: concurrent.futures.Future[None] | None = None
        for mv in targets:
            _readinto_exact(f, mv, path)
            if pending is not None:
                pending.result()
            pending = pool.submit(h.update, mv)
        if pending is not None:
            pending.result()


def sha256_file(path: Path) -> str:
    """The sha256 of a file, reading and hashing in parallel through two alternating buffers."""
    size = path.stat().st_size
    bufs = [memoryview(bytearray(min(CHUNK, size) or 1)) for _ in range(2)]

    def targets() -> Iterator[memoryview]:
        for i, start in enumerate(range(0, size, CHUNK)):
            yield bufs[i % 2][: min(CHUNK, size - start)]

    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        _hashed_reads(f, targets(), h, path)
    return h.hexdigest()


def read_tensors(path: Path, names: Iterable[str], *, expect_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read the named tensors of a safetensors file into fresh tensors (no mmap: they outlive the file).

    With ``expect_sha256`` the whole file is read in order and hashed on the way (tensors not asked for go through
    a scratch buffer), and a mismatch raises :class:`CheckpointError`; without it, only the asked-for bytes are read.
    """
    header, data_start = read_header(path)
    wanted = set(names)
    unknown = wanted - header.keys()
    if unknown:
        raise CheckpointError(f"{path}: no tensor(s) {sorted(unknown)[:5]} in this file")
    out: dict[str, torch.Tensor] = {}
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        if expect_sha256 is None:
            for name, e in entries:
                if name in wanted:
                    out[name] = t = _empty(path, name, e)
                    f.seek(data_start + e["data_offsets"][0])
                    _readinto_exact(f, _raw_bytes_writable(t), path)
            return out
        scratch = [memoryview(bytearray(CHUNK)) for _ in range(2)]
        turn = [0]

        def targets() -> Iterator[memoryview]:
            yield memoryview(bytearray(data_start))  # the header, re-read so that it is hashed too
            pos = 0
            for name, e in entries:
                begin, end = e["data_offsets"]
                if begin != pos:
                    raise CheckpointError(f"{path}: tensor {name!r} does not start where the previous one ended")
                if name in wanted:
                    out[name] = t = _empty(path, name, e)
                    yield from chunks([_raw_bytes_writable(t)])
                else:
                    for start in range(begin, end, CHUNK):
                        turn[0] ^= 1
                        yield scratch[turn[0]][: min(CHUNK, end - start)]
                pos = end
            rest = os.fstat(f.fileno()).st_size - data_start - pos
            if rest:
                yield memoryview(bytearray(rest))

        h = hashlib.sha256()
        _hashed_reads(f, targets(), h, path)
    if h.hexdigest() != expect_sha256:
        raise CheckpointError(f"{path}: sha256 is {h.hexdigest()}, the manifest expects {expect_sha256}; "
                              "the file was altered or is corrupt")
    return out


def _empty(path: Path, name: str, entry: Mapping[str, Any]) -> torch.Tensor:
    dtype = TORCH_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which this reader does not know")
    t = torch.empty(entry["shape"], dtype=dtype)
    begin, end = entry["data_offsets"]
    if end - begin != t.numel() * t.element_size():
        raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes but its shape {entry['shape']} "
                              f"and dtype {entry['dtype']} need {t.numel() * t.element_size()}")
    return t


def _raw_bytes_writable(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_text_durable(path: Path, text: str) -> None:
    """Write ``text`` next to ``path``, fsync it, then atomically rename it over ``path``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
