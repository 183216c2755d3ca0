"""The transport seam: how stage workers exchange tensors (and python scalars) and run collectives.

>>> import torch
>>> from stagewise.comm import LocalHub
>>> hub = LocalHub(2)                     # in-process ranks for tests; DistTransport.init(...) for real processes
>>> a, b = hub.transport(0), hub.transport(1)
>>> handle = a.isend([torch.ones(2, 3), 7, None], dst=1, tag=0)
>>> b.recv(src=0, tag=0, expect=[((2, 3), torch.float32), int, None])
[tensor([[1., 1., 1.],
        [1., 1., 1.]]), 7, None]
>>> handle.wait()

Messages are framed without pickle (an int64 header, then raw tensor bytes; see ``_framing``). :class:`Transport` is
the interface; :class:`DistTransport` runs on torch.distributed (gloo on CPU, NCCL on CUDA), :class:`LocalTransport`
on threads. :func:`spawn` starts one real process per rank and never leaves one behind.
"""

from ._dist import DistTransport
from ._errors import (
    BoundaryMismatchError,
    CommError,
    CommTimeoutError,
    FramingError,
    SpawnError,
    TransportClosedError,
)
from ._expect import check_expect
from ._framing import DTYPE_CODES, Value
from ._local import LocalHub, LocalTransport
from ._spawn import find_free_port, spawn
from ._transport import CommGroup, ReduceOp, SendHandle, Transport

__all__ = [
    "DTYPE_CODES",
    "BoundaryMismatchError",
    "CommError",
    "CommGroup",
    "CommTimeoutError",
    "DistTransport",
    "FramingError",
    "LocalHub",
    "LocalTransport",
    "ReduceOp",
    "SendHandle",
    "SpawnError",
    "Transport",
    "TransportClosedError",
    "Value",
    "check_expect",
    "find_free_port",
    "spawn",
]
