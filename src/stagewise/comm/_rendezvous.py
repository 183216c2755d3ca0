"""Where the ranks of a process group find each other: a free port, and a rendezvous store that listens only on the
address the run uses.

torch's ``TCPStore`` master (what ``init_process_group(init_method="tcp://...")`` makes on rank 0) listens on every
interface, and any process that reaches it can set and get keys. So rank 0 binds the listening socket itself, to the
run's address (127.0.0.1 for a local run), and hands it to the store (``master_listen_fd``); the other ranks connect
as clients.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import struct
from typing import Any

import torch.distributed as dist

from .._errors import ConfigError

__all__ = ["find_free_port", "interface_address", "interface_towards", "rendezvous_store", "use_interface"]

_BACKLOG = 1024  # connections the store's socket queues: every rank connects once, several times with libuv


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (bind to port 0, read it, release it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rendezvous_store(*, host: str, port: int, rank: int, world_size: int, timeout: float) -> Any:
    """The ``torch.distributed`` store of a process group: served by rank 0 on ``host:port`` only (not on every
    interface), a client on the other ranks. ``host`` is an address or a name that resolves to one of this machine's
    addresses on rank 0."""
    wait = datetime.timedelta(seconds=timeout)
    if rank != 0:
        return dist.TCPStore(host, port, world_size, False, wait)
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(_BACKLOG)
        store = dist.TCPStore(host, port, world_size, True, wait, master_listen_fd=listener.fileno())
    except BaseException:
        try:
            listener.close()
        except OSError:  # a store that failed after taking the descriptor closed it: its own error is the one to see
            listener.detach()
        raise
    listener.detach()  # the store owns the descriptor now
    return store


_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_address(name: str) -> str | None:
    """The IPv4 address of this host's network interface ``name``, or None when it has none (or no such one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_towards(address: str) -> str | None:
    """The name of this host's interface whose address the kernel sends from to reach ``address`` (for a process
    that only knows its peer's address), or None when none has it (the loopback included)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((address, 9))  # UDP: no packet is sent, the kernel only picks the route
            source = s.getsockname()[0]
    except OSError:
        return None
    return next((name for _, name in socket.if_nameindex() if interface_address(name) == source), None)


def use_interface(name: str) -> str:
    """Make gloo and NCCL talk through this host's interface ``name`` (``GLOO_SOCKET_IFNAME``, ``NCCL_SOCKET_IFNAME``,
    read when a process group starts); returns its address. A name this host does not have is a ConfigError listing
    the ones it has."""
    names = [n for _, n in socket.if_nameindex()]
    if name not in names:
        raise ConfigError(f"--iface {name}: this host ({socket.gethostname()}) has no such network interface; it has "
                          f"{', '.join(names)}")
    os.environ["GLOO_SOCKET_IFNAME"] = name
    os.environ["NCCL_SOCKET_IFNAME"] = name
    return interface_address(name) or "no IPv4 address"
