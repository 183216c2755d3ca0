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
the interface; :class:`DistTransport` runs on torch.distributed (gloo on CPU, NCCL on CUDA), :class:`ShmTransport`
on shared-memory rings between ranks of one host (collectives on gloo), :class:`LocalTransport` on threads. Rank 0
serves the group's rendezvous store on the run's address only (:func:`rendezvous_store`); starting the processes is
:mod:`stagewise.launch`'s job.
"""

from ._dist import DistTransport
from ._errors import (
    BoundaryMismatchError,
    CommError,
    CommTimeoutError,
    FramingError,
    RendezvousError,
    SpawnError,
    TransportClosedError,
)
from ._expect import check_expect
from ._framing import DTYPE_CODES, Value
from ._local import LocalHub, LocalTransport
from ._rendezvous import find_free_port, interface_address, interface_towards, rendezvous_store, use_interface
from ._shm import ShmTransport, remove_shm_segments
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
    "RendezvousError",
    "SendHandle",
    "ShmTransport",
    "SpawnError",
    "Transport",
    "TransportClosedError",
    "Value",
    "check_expect",
    "find_free_port",
    "interface_address",
    "interface_towards",
    "remove_shm_segments",
    "rendezvous_store",
    "use_interface",
]
