"""The torch.distributed transport: gloo on CPU (what the tests run), NCCL on CUDA.

What this relies on from torch.distributed:

- gloo p2p honours tags (a tag selects a 32-bit "slot"); receives posted on one (src, tag) are matched to that
  sender's messages on the tag in the order sent. A frame is several messages on the same tag (header, optional
  extension, pack, large tensors), so all of a frame's receives are posted together once the header has arrived.
- gloo ``send`` completes only when the receiver has posted a matching receive (a rendezvous), and gloo work objects
  report ``is_completed()`` only after ``wait()``; so deadlines use ``work.wait(timeout)``. When that times out gloo
  closes the link to the peer ("Application timeout caused pair closure"): after a :class:`CommTimeoutError` close
  the transport.
- gloo lets a receive buffer be longer than the message it matches (the bytes land at its start). So on gloo the
  first message of a frame (header + inline pack) is only as long as what it carries, received into a reused buffer of
  the largest possible size; NCCL needs equal counts, so there it is padded to that size.
- NCCL ignores tags (per-pair order only; see :func:`~stagewise.comm._framing.parse_header`) and ``wait()`` only
  orders CUDA streams, so deadlines poll ``is_completed()``. Tensors travel on ``device`` (the rank's GPU); CPU values
  are copied there and received tensors land there.
- Ranks that share a GPU cannot use NCCL ("Duplicate GPU detected"), and gloo cannot read CUDA memory. So gloo with a
  CUDA ``device`` is the *staged* mode (:attr:`DistTransport.staged`): the wire is the CPU, every CUDA tensor sent or
  reduced is first copied to pinned host memory (see ``_staging``), and received values (and reduced tensors) are
  copied back to ``device``. With a CPU ``device`` nothing is staged: gloo reads and writes the caller's tensors.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._errors import CommError, CommTimeoutError
from ._expect import check_expect
from ._framing import (
    HEADER_SLOTS,
    HEADER_STRUCT,
    Value,
    as_bytes,
    buffer_layout,
    materialise_from,
    parse_descriptors,
    parse_header,
    prepare,
)
from ._rendezvous import rendezvous_store
from ._staging import pinned_empty, to_device, to_host
from ._transport import CommGroup, ReduceOp, SendHandle, Transport

__all__ = ["DistTransport"]

log = logging.getLogger(__name__)

_BACKENDS = ("gloo", "nccl")
_HEADER_BYTES = HEADER_SLOTS * 8
_INLINE_BYTES = 64 * 1024
_FIRST_BYTES = _HEADER_BYTES + _INLINE_BYTES


def _inline_bytes(pack_bytes: int, has_extension: bool) -> int:
    """Bytes of the small-tensor pack that ride inside the first message (0: it travels on its own). isend and recv
    must agree: the pack is inline when there is no descriptor extension and it fits the inline area."""
    return pack_bytes if not has_extension and pack_bytes <= _INLINE_BYTES else 0


def _wait(transport: DistTransport, work: Any, *, when: tuple[float, float], op: str, peer: int | None = None,
          tag: int | None = None) -> None:
    """Wait for one work object until the deadline of ``when`` (``(timeout, deadline)`` from ``Transport._deadline``);
    translate backend failures into comm errors naming ``op`` (and ``peer`` and ``tag`` for point-to-point ones)."""
    waited, deadline = when
    try:
        if transport.backend == "nccl":
            while not work.is_completed():
                if time.monotonic() >= deadline:
                    raise CommTimeoutError(op=op, rank=transport.rank, peer=peer, tag=tag, waited=waited)
                time.sleep(0.0002)
            work.wait()  # orders the current CUDA stream after the transfer
        else:
            left = max(deadline - time.monotonic(), 0.001)  # a zero timedelta would mean "no timeout"
            work.wait(datetime.timedelta(seconds=left))
    except CommTimeoutError:
        raise
    except RuntimeError as exc:
        text = str(exc)
        if "timed out" in text.lower() or ("timeout" in text.lower() and time.monotonic() >= deadline - 0.01):
            raise CommTimeoutError(op=op, rank=transport.rank, peer=peer, tag=tag, waited=waited,
                                   detail=text.splitlines()[0][-200:]) from exc
        where = f"rank {transport.rank}: {op}" + ("" if peer is None else f" with rank {peer} (tag {tag})")
        raise CommError(f"{where} failed: {text.splitlines()[0] if text else type(exc).__name__}; the peer process "
                        "probably exited or crashed, check its log") from exc


class _DistSendHandle(SendHandle):
    def __init__(self, transport: DistTransport, works: list[Any], keepalive: list[torch.Tensor], *, dst: int,
                 tag: int) -> None:
        self._transport, self._works, self._keepalive = transport, works, keepalive
        self._dst, self._tag = dst, tag

    def wait(self, timeout: float | None = None) -> None:
        when = self._transport._deadline(timeout)
        while self._works:
            _wait(self._transport, self._works[0], when=when, op="send", peer=self._dst, tag=self._tag)
            self._works.pop(0)
        self._keepalive = []


class DistTransport(Transport):
    """A :class:`Transport` over the default torch.distributed process group.

    Build with :meth:`init` (starts the process group; under torchrun through ``stagewise.launch``) or
    :meth:`from_process_group` (wraps a group somebody else initialised; ``close`` then leaves it alone).
    ``backend`` is ``"gloo"`` or ``"nccl"``; ``device`` is where received tensors land: the rank's GPU with NCCL, the
    CPU or a GPU with gloo. gloo with a GPU ``device`` is :attr:`staged`: tensors cross through pinned host memory, for
    ranks that share one GPU (NCCL refuses those).
    """

    def __init__(self, *, timeout: float = 30.0, device: torch.device | str | None = None,
                 owns_process_group: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialised; use DistTransport.init(...)")
        backend = str(dist.get_backend()).lower()
        if backend not in _BACKENDS:
            raise ValueError(f"process group backend {backend!r} is not supported; use one of {_BACKENDS}")
        super().__init__(rank=dist.get_rank(), world_size=dist.get_world_size(), timeout=timeout)
        self.backend = backend
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"backend 'nccl' moves CUDA tensors; device must be a CUDA device, got {self.device}")
        if backend == "gloo" and self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'gloo' moves CPU tensors, staging CUDA ones through the host; device must be "
                             f"'cpu' or a CUDA device, got {self.device}")
        self.staged = backend == "gloo" and self.device.type == "cuda"
        """True when tensors travel through pinned host memory (gloo, CUDA ``device``)."""
        self._wire = torch.device("cpu") if backend == "gloo" else self.device  # where the backend reads and writes
        self._owns = owns_process_group
        self._trim = backend == "gloo"  # see the module docstring: gloo accepts a message shorter than its buffer
        self._landing: tuple[torch.Tensor, np.ndarray | None] | None = None
        self._posted: dict[tuple[int, int], tuple[tuple[torch.Tensor, np.ndarray | None], Any]] = {}
        self._pg = dist.group.WORLD
        self.store: Any = None
        """The rendezvous store of the process group :meth:`init` started (ranks share small data through it, e.g.
        their stages under torchrun); None for a group somebody else started."""

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def init(cls, *, rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 0,
             backend: str = "gloo", timeout: float = 30.0, device: torch.device | str | None = None,
             local_rank: int | None = None, store: Any = None) -> DistTransport:
        """Start the default process group; its rendezvous store is ``store`` when given (e.g. torchrun's), else one
        that rank 0 serves on ``master_addr:master_port``, listening on that address only
        (:func:`~stagewise.comm.rendezvous_store`).

        ``timeout`` is both the process group's timeout and the default deadline of every wait. With NCCL, ``device``
        defaults to GPU ``local_rank % device_count`` (``local_rank`` defaults to ``rank``); a ``device`` of
        ``"cuda"`` without an index means that GPU too (with gloo it makes the transport :attr:`staged`).
        """
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if store is None and (not isinstance(master_port, int) or not 0 < master_port < 65536):
            raise ValueError(f"master_port must be a TCP port in 1..65535, got {master_port!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if dist.is_initialized():
            raise ValueError("torch.distributed is already initialised; use DistTransport.from_process_group()")
        device = cls._pick_device(backend, rank if local_rank is None else local_rank, device)
        if store is None:
            log.debug("rank %s/%s: init %s process group at %s:%s", rank, world_size, backend, master_addr,
                      master_port)
            store = rendezvous_store(host=master_addr, port=master_port, rank=rank, world_size=world_size,
                                     timeout=timeout)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        transport = cls(timeout=timeout, device=device, owns_process_group=True)
        transport.store = store
        return transport

    @classmethod
    def from_process_group(cls, *, timeout: float = 30.0, device: torch.device | str | None = None) -> DistTransport:
        """Wrap the already initialised default process group (``close()`` will not destroy it)."""
        return cls(timeout=timeout, device=device, owns_process_group=False)

    @staticmethod
    def _pick_device(backend: str, local_rank: int, device: torch.device | str | None) -> torch.device:
        if backend != "nccl":
            dev = torch.device("cpu") if device is None else torch.device(device)
            if dev.type != "cuda":
                return dev
        elif not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA, which is not available here; use backend='gloo'")
        else:
            dev = torch.device("cuda") if device is None else torch.device(device)
        if not torch.cuda.is_available():
            raise ValueError(f"device {dev} needs CUDA, which is not available here; use device='cpu'")
        if dev.index is None:  # one GPU per local rank, wrapping around when ranks outnumber GPUs (gloo, staged)
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev

    # -- point to point ------------------------------------------------------------------------------------------
    def isend(self, values: Sequence[Value], *, dst: int, tag: int = 0) -> SendHandle:
        self._check_peer(dst, name="dst")
        self._check_tag(tag)
        if self.staged:  # CUDA tensors -> pinned host copies; the gloo path below then sends those
            values = to_host(values)
        p = prepare(values)
        # The first message is the header followed by an inline area: when every small tensor fits there (the common
        # case: activations and gradients of a microbatch), the whole message is ONE transfer instead of two.
        extension = p.extension()
        inline = _inline_bytes(p.pack_bytes, extension is not None)
        if self._trim:  # gloo, CPU: exactly the bytes carried, written through numpy (no memset, no torch slicing)
            first = torch.empty(_HEADER_BYTES + inline, dtype=torch.uint8)
            first_np = first.numpy()
            p.write_header(first_np, src=self.rank, tag=tag)
            if inline:
                p.write_pack(first, _HEADER_BYTES, first_np)
        else:  # NCCL: fixed size (receives must match it), on the device; the bytes after what is carried are never
            # read, so they are left as they are (no memset of the whole area each message)
            header = torch.empty(_HEADER_BYTES, dtype=torch.uint8)
            p.write_header(header.numpy(), src=self.rank, tag=tag)
            first = torch.empty(_FIRST_BYTES, dtype=torch.uint8, device=self.device)
            first[:_HEADER_BYTES].copy_(header)
            if inline:
                p.write_pack(first, _HEADER_BYTES)
        tensors = [first]
        if extension is not None:
            tensors.append(extension.to(self._wire))
        if p.small and not inline:
            pack = torch.empty(p.pack_bytes, dtype=torch.uint8, device=self._wire)
            p.write_pack(pack)
            tensors.append(pack)
        for t in p.large:  # sent from the caller's memory when possible (it must not change them until wait())
            tensors.append(as_bytes(t).to(self._wire))
        works = [self._pg.send([t], dst, tag) for t in tensors]  # what dist.isend ends with, minus its per-call checks
        return _DistSendHandle(self, works, tensors, dst=dst, tag=tag)

    def post_recv(self, *, src: int, tag: int = 0) -> None:
        """Post the receive of the next message's first transfer from ``src`` on ``tag`` now (gloo; a no-op on NCCL,
        which matches point-to-point operations in issue order, not by tag). The sender's ``isend`` then finds it
        waiting and its bytes land while this rank computes; the next ``recv(src=src, tag=tag)`` completes it."""
        self._check_peer(src, name="src")
        self._check_tag(tag)
        if self.backend != "gloo" or (src, tag) in self._posted:
            return
        landing = self._new_landing()
        self._posted[(src, tag)] = (landing, self._pg.recv([landing[0]], src, tag))

    def _new_landing(self) -> tuple[torch.Tensor, np.ndarray | None]:
        first = torch.empty(_FIRST_BYTES, dtype=torch.uint8, device=self._wire)
        return first, first.numpy() if first.is_cpu else None

    def recv(self, *, src: int, tag: int = 0, timeout: float | None = None,
             expect: Sequence[Any] | None = None) -> list[Value]:
        self._check_peer(src, name="src")
        self._check_tag(tag)
        when = self._deadline(timeout)

        def wait(work: Any) -> None:
            _wait(self, work, when=when, op="recv", peer=src, tag=tag)

        posted = self._posted.pop((src, tag), None)
        if posted is not None:  # received ahead (post_recv): the first transfer may already be here
            landing, work = posted
        else:
            # On gloo the landing buffer of first messages is reused: values are copied out of it before recv
            # returns. It is taken away while in use, so after a failure (a receive may still be pending in gloo) a
            # new one is made.
            landing = self._landing
            self._landing = None
            if landing is None:
                landing = self._new_landing()
            work = self._pg.recv([landing[0]], src, tag)
        first, first_np = landing
        wait(work)
        if first_np is not None:
            h: Sequence[int] = HEADER_STRUCT.unpack_from(first_np)
        else:
            h = first[:_HEADER_BYTES].view(torch.int64).tolist()
        _, ext_len = parse_header(h, src=src, tag=tag)
        extension = None
        if ext_len:
            ext = torch.empty(ext_len, dtype=torch.int64, device=self._wire)
            wait(self._pg.recv([ext], src, tag))
            extension = ext.tolist()
        descs = parse_descriptors(h, extension)
        sizes, where, pack_bytes = buffer_layout(descs)
        inline = _inline_bytes(pack_bytes, extension is not None)
        rest = sizes[1:] if inline else sizes  # what follows the first message
        if self.staged:  # pinned: the copies to the GPU below run asynchronously
            buffers = [pinned_empty((n,), torch.uint8) for n in rest]
        else:
            buffers = [torch.empty(n, dtype=torch.uint8, device=self._wire) for n in rest]
        works = [self._pg.recv([b], src, tag) for b in buffers]
        for w in works:  # posted together: they match in send order
            wait(w)
        if inline:  # the pack rode in the first message, after the header; ``buffers`` hold the large tensors
            pack: torch.Tensor | None = first[_HEADER_BYTES:_HEADER_BYTES + pack_bytes]
        else:
            pack, buffers = (buffers[0], buffers[1:]) if pack_bytes else (None, buffers)
        values = materialise_from(descs, where, pack=pack, large=buffers, device=self._wire)
        if self.staged:  # host values -> this rank's GPU
            values = to_device(values, self.device)
        if self._trim and posted is None:  # every small value was copied out: the buffer may take the next message
            self._landing = landing
        check_expect(values, expect, where=f"recv on rank {self.rank} from rank {src} (tag {tag})")
        return values

    # -- collectives ---------------------------------------------------------------------------------------------
    def _on_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself when the backend can use it in place, else a contiguous copy where the backend reads it
        (:attr:`device`; the CPU with gloo, in pinned memory when the tensor is on a GPU)."""
        if tensor.device == self._wire and tensor.is_contiguous():
            return tensor.detach()
        if self._wire.type == "cpu" and tensor.device.type == "cuda":
            (host,) = to_host([tensor.detach()])
            assert isinstance(host, torch.Tensor)
            return host
        return tensor.detach().to(self._wire, memory_format=torch.contiguous_format, copy=True)

    def all_reduce(self, tensor: torch.Tensor, *, group: CommGroup | None = None, op: ReduceOp = "sum",
                   timeout: float | None = None) -> None:
        self._check_reduce(tensor, op)
        g = self._resolve_group(group, op="all_reduce")
        when = self._deadline(timeout)
        wire = self._on_wire(tensor)
        work = dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=g.handle, async_op=True)
        _wait(self, work, when=when, op="all_reduce")
        with torch.no_grad():
            if op == "mean":
                wire.div_(g.size)
            if wire.data_ptr() != tensor.data_ptr():
                tensor.copy_(wire)

    def broadcast(self, tensor: torch.Tensor, *, src: int, group: CommGroup | None = None,
                  timeout: float | None = None) -> None:
        g = self._resolve_group(group, op="broadcast")
        if src not in g.ranks:
            raise ValueError(f"broadcast src={src} is not in group {g.ranks}")
        when = self._deadline(timeout)
        wire = self._on_wire(tensor)
        work = dist.broadcast(wire, src=src, group=g.handle, async_op=True)
        _wait(self, work, when=when, op="broadcast")
        if wire.data_ptr() != tensor.data_ptr():
            with torch.no_grad():
                tensor.copy_(wire)

    def new_group(self, ranks: Sequence[int]) -> CommGroup:
        members = self._check_group_ranks(ranks)
        if members == self.world.ranks:
            return self.world
        handle = dist.new_group(ranks=list(members), timeout=datetime.timedelta(seconds=self.timeout))
        return CommGroup(ranks=members, handle=handle)

    def barrier(self, timeout: float | None = None) -> None:
        # A one-element all_reduce rather than dist.barrier(): it honours our deadline on every backend.
        self._resolve_group(None, op="barrier")
        when = self._deadline(timeout)
        work = dist.all_reduce(torch.zeros(1, device=self._wire), group=None, async_op=True)
        _wait(self, work, when=when, op="barrier")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()
