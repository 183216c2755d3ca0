"""The cluster a plan is made for: nodes of devices, their memory, and the links between them. Round-trips TOML.

A cluster file looks like this (``Cluster.to_toml`` writes it; ``stagewise probe`` fills in measured links)::

    intra_bandwidth = 2000000000.0   # bytes/s between two devices of one node
    intra_latency = 5e-05            # seconds per message between two devices of one node
    inter_bandwidth = 1250000000.0   # bytes/s between devices on different nodes
    inter_latency = 0.0001
    allreduce_bandwidth = 1000000000.0
    allreduce_latency = 0.0001       # seconds per ring step of an all-reduce
    send_overhead = 0.0001           # seconds a rank is busy posting one message
    recv_overhead = 0.0001           # seconds a rank is busy taking in one message that has arrived
    action_overhead = 5e-05          # seconds of runtime bookkeeping per compute action (F, B, I, W)
    contention = 1.2                 # slowdown of a device's compute while all devices of its node compute

    [[nodes]]
    name = "gpu-a"
    devices = 8
    device_kind = "cuda"
    memory_bytes = 85899345920       # per device
    flops = 1.0e14                   # optional hint

    [[links]]                        # optional: a link between two nodes unlike inter_bandwidth/inter_latency
    a = "gpu-a"
    b = "gpu-b"
    bandwidth = 25000000.0           # bytes/s (``stagewise probe --hosts`` measures it)
    latency = 0.0002

Global device ``g`` is the ``g``-th device counting node by node in file order; a plan puts rank ``g`` on it (which
stage and replica rank ``g`` runs is the plan's :attr:`~stagewise.plan.Plan.rank_order`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["DEVICE_KINDS", "Cluster", "HostLink", "Node"]

log = logging.getLogger(__name__)

DEVICE_KINDS = ("cpu", "cuda")

# Defaults for links nobody measured yet (``stagewise probe`` replaces the intra-node ones and the rank costs).
_DEFAULT_LINKS = {
    # measured with `stagewise probe` on a quiet 2-core KVM machine, gloo over loopback
    "cpu": {"intra_bandwidth": 1.2e9, "intra_latency": 5e-4, "inter_bandwidth": 1.25e9, "inter_latency": 1e-3,
            "allreduce_bandwidth": 6e8, "allreduce_latency": 2.2e-4, "send_overhead": 4e-4, "recv_overhead": 5e-4,
            "action_overhead": 5e-5, "contention": 1.05},
    "cuda": {"intra_bandwidth": 1e11, "intra_latency": 1e-5, "inter_bandwidth": 1.25e10, "inter_latency": 2e-5,
             "allreduce_bandwidth": 5e10, "allreduce_latency": 2e-5, "send_overhead": 3e-5, "recv_overhead": 3e-5,
             "action_overhead": 5e-5, "contention": 1.0},
}


def local_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a finite number > 0, got {value!r}")
    return float(value)


def _non_negative_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(kw_only=True)
class Node:
    """One machine: some identical devices."""

    name: str
    """Host name (only used in messages and reports)."""
    devices: int
    """Devices on this node: CUDA GPUs, or CPU processes (one per core) for ``cpu``."""
    memory_bytes: int
    """Memory of *one* device in bytes (GPU memory, or the node's RAM divided by its CPU devices)."""
    device_kind: str = "cpu"
    """``cpu`` or ``cuda``."""
    flops: float | None = None
    """Optional hint: floating-point operations per second of one device (informational; plans use measured times)."""

    def __post_init__(self) -> None:
        self.validate("node")

    def validate(self, where: str) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"{where}.name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.devices) or self.devices < 1:
            raise ValueError(f"{where}.devices must be an int >= 1, got {self.devices!r}")
        if isinstance(self.memory_bytes, float) and self.memory_bytes.is_integer():
            self.memory_bytes = int(self.memory_bytes)  # TOML users write 8e9
        if not _is_int(self.memory_bytes) or self.memory_bytes < 1:
            raise ValueError(f"{where}.memory_bytes must be an int >= 1 (bytes per device), got {self.memory_bytes!r}")
        if self.device_kind not in DEVICE_KINDS:
            raise ValueError(f"{where}.device_kind must be one of {DEVICE_KINDS}, got {self.device_kind!r}")
        if self.flops is not None:
            self.flops = _positive_number(f"{where}.flops", self.flops)


@dataclasses.dataclass(kw_only=True)
class HostLink:
    """The link between two nodes when it is not the cluster's ``inter_bandwidth``/``inter_latency`` (a slower
    uplink, another rack): point-to-point transfers and all-reduces between those nodes use it."""

    a: str
    """One node's name."""
    b: str
    """The other node's name."""
    bandwidth: float
    """Bytes per second between a device of ``a`` and one of ``b``."""
    latency: float
    """Seconds per message between them."""
    allreduce_bandwidth: float | None = None
    """Bus bandwidth of an all-reduce between them, bytes per second (it sends both ways at once, which a shaped link
    may carry far slower than one way); None: ``bandwidth``."""

    def validate(self, where: str, names: list[str]) -> None:
        for end in ("a", "b"):
            if getattr(self, end) not in names:
                raise ValueError(f"{where}.{end} must name a node ({', '.join(names)}), got {getattr(self, end)!r}")
        if self.a == self.b:
            raise ValueError(f"{where} links node {self.a!r} to itself; links join two different nodes")
        self.bandwidth = _positive_number(f"{where}.bandwidth", self.bandwidth)
        self.latency = _non_negative_number(f"{where}.latency", self.latency)
        if self.allreduce_bandwidth is not None:
            self.allreduce_bandwidth = _positive_number(f"{where}.allreduce_bandwidth", self.allreduce_bandwidth)


@dataclasses.dataclass(kw_only=True)
class Cluster:
    """Nodes, device memory and link speeds: everything the cost model needs to know about the hardware."""

    nodes: list[Node]
    """The machines, in rank order (node 0 holds global devices ``0 .. nodes[0].devices - 1``)."""
    intra_bandwidth: float = 2e9
    """Bytes per second between two devices of the same node (point to point)."""
    intra_latency: float = 5e-5
    """Seconds per message between two devices of the same node."""
    inter_bandwidth: float = 1.25e9
    """Bytes per second between devices on different nodes."""
    inter_latency: float = 1e-4
    """Seconds per message between devices on different nodes."""
    allreduce_bandwidth: float = 1e9
    """Bus bandwidth of a ring all-reduce inside one node, bytes per second: an all-reduce of ``n`` bytes over ``D``
    devices takes ``2 (D - 1) / D * n / allreduce_bandwidth`` plus ``2 (D - 1)`` times ``allreduce_latency``. A group
    spanning nodes is further limited to ``inter_bandwidth`` (and pays at least ``inter_latency`` per step)."""
    allreduce_latency: float = 1e-4
    """Seconds per ring step of an all-reduce inside one node (a tiny all-reduce over ``D`` devices takes
    ``2 (D - 1)`` of them); also prices the loss all-reduce every training step ends with."""
    send_overhead: float = 1e-4
    """Seconds a rank is busy posting one point-to-point transfer (framing it, then its header and payload
    messages); the rank computes nothing meanwhile."""
    recv_overhead: float = 1e-4
    """Seconds a rank is busy taking in one transfer that has already arrived (header, then payload)."""
    action_overhead: float = 5e-5
    """Seconds of runtime bookkeeping per compute action (F, B, I, W) on top of the profiled compute."""
    contention: float = 1.0
    """How many times slower a device computes while every device of its node computes too: CPU cores share memory
    bandwidth and caches (``stagewise probe`` measures it); 1.0 for independent devices such as GPUs. With ``k`` of a
    node's ``n`` devices busy, each computes ``1 + (contention - 1) (k - 1) / (n - 1)`` times slower."""
    links: list[HostLink] = dataclasses.field(default_factory=list)
    """Links between two nodes that differ from ``inter_bandwidth``/``inter_latency`` (one per pair at most)."""

    def __post_init__(self) -> None:
        if not isinstance(self.nodes, list) or not self.nodes:
            raise ValueError("cluster.nodes must be a non-empty list of nodes (add a [[nodes]] table)")
        for i, node in enumerate(self.nodes):
            if not isinstance(node, Node):
                raise ValueError(f"cluster.nodes[{i}] must be a Node, got {type(node).__name__}")
            node.validate(f"cluster.nodes[{i}]")
        names = [node.name for node in self.nodes]
        pairs = set()
        for i, link in enumerate(self.links):
            if not isinstance(link, HostLink):
                raise ValueError(f"cluster.links[{i}] must be a HostLink, got {type(link).__name__}")
            link.validate(f"cluster.links[{i}]", names)
            pair = frozenset((link.a, link.b))
            if pair in pairs:
                raise ValueError(f"cluster.links[{i}]: the link {link.a} - {link.b} is listed twice")
            pairs.add(pair)
        for name in ("intra_bandwidth", "inter_bandwidth", "allreduce_bandwidth"):
            setattr(self, name, _positive_number(f"cluster.{name}", getattr(self, name)))
        self.contention = _positive_number("cluster.contention", self.contention)
        if self.contention < 1.0:
            raise ValueError(f"cluster.contention must be >= 1 (1: devices never slow each other), got "
                             f"{self.contention}")
        for name in ("intra_latency", "inter_latency", "allreduce_latency", "send_overhead", "recv_overhead",
                     "action_overhead"):
            setattr(self, name, _non_negative_number(f"cluster.{name}", getattr(self, name)))

    # -- queries -------------------------------------------------------------------------------------------------
    @property
    def num_devices(self) -> int:
        """All devices of all nodes."""
        return sum(node.devices for node in self.nodes)

    @property
    def device_memory(self) -> int:
        """The smallest per-device memory: the cap every stage must fit under (a rank may land on any device)."""
        return min(node.memory_bytes for node in self.nodes)

    @property
    def device_kind(self) -> str:
        """``cuda`` if every node has GPUs, else ``cpu``."""
        return "cuda" if all(node.device_kind == "cuda" for node in self.nodes) else "cpu"

    def node_of(self) -> list[int]:
        """Node index of every global device."""
        return [i for i, node in enumerate(self.nodes) for _ in range(node.devices)]

    def link(self, a: int, b: int) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) of the point-to-point link between global devices ``a`` and ``b``."""
        nodes = self.node_of()
        for d in (a, b):
            if not 0 <= d < len(nodes):
                raise ValueError(f"device {d} does not exist; the cluster has {len(nodes)} devices")
        if nodes[a] == nodes[b]:
            return self.intra_bandwidth, self.intra_latency
        return self.node_link(nodes[a], nodes[b])

    def node_link(self, i: int, j: int, *, allreduce: bool = False) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) between a device of node ``i`` and one of node ``j`` (``i != j``); with
        ``allreduce`` the bus bandwidth of an all-reduce between them."""
        names = {self.nodes[i].name, self.nodes[j].name}
        for link in self.links:
            if {link.a, link.b} == names:
                both_ways = link.allreduce_bandwidth if allreduce else None
                return both_ways or link.bandwidth, link.latency
        return self.inter_bandwidth, self.inter_latency

    def allreduce_link(self, devices: list[int]) -> tuple[float, float]:
        """(bus bandwidth bytes/s, latency per ring step s) of an all-reduce over ``devices``: a group spanning
        nodes is as slow as the slowest link between two of them."""
        nodes = self.node_of()
        used = sorted({nodes[d] for d in devices})
        if len(used) <= 1:
            return self.allreduce_bandwidth, self.allreduce_latency
        links = [self.node_link(i, j, allreduce=True) for k, i in enumerate(used) for j in used[k + 1:]]
        return (min(self.allreduce_bandwidth, *(bw for bw, _ in links)),
                max(self.allreduce_latency, *(lat for _, lat in links)))

    def take(self, devices: int) -> Cluster:
        """The same cluster cut down to its first ``devices`` devices (node order)."""
        if not _is_int(devices) or devices < 1:
            raise ValueError(f"devices must be an int >= 1, got {devices!r}")
        if devices > self.num_devices:
            raise ValueError(f"--devices {devices} asks for more devices than the cluster has ({self.num_devices}); "
                             "describe the larger cluster in a cluster TOML file (--cluster FILE)")
        nodes, left = [], devices
        for node in self.nodes:
            if left == 0:
                break
            nodes.append(dataclasses.replace(node, devices=min(node.devices, left)))
            left -= nodes[-1].devices
        kept = {node.name for node in nodes}
        return dataclasses.replace(self, nodes=nodes, links=[k for k in self.links if {k.a, k.b} <= kept])

    # -- this machine --------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, *, use_cuda: bool = True) -> Cluster:
        """This machine as a one-node cluster: its CUDA GPUs if torch sees any (and ``use_cuda``), else its CPU cores
        (one device per usable core, each with an equal share of the RAM). Links get rough defaults; run
        ``stagewise probe`` to measure them."""
        host = socket.gethostname() or "localhost"
        try:
            import torch

            gpus = torch.cuda.device_count() if use_cuda and torch.cuda.is_available() else 0
        except Exception:  # noqa: BLE001 - a broken CUDA install must not stop planning on CPU
            log.warning("could not query CUDA devices; planning for CPUs", exc_info=True)
            gpus = 0
        if gpus:
            memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(gpus))
            node = Node(name=host, devices=gpus, memory_bytes=int(memory), device_kind="cuda")
        else:
            cores = local_cores()
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            node = Node(name=host, devices=cores, memory_bytes=int(ram // cores), device_kind="cpu")
        log.debug("detected %s", node)
        return cls(nodes=[node], **_DEFAULT_LINKS[node.device_kind])

    # -- TOML ----------------------------------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The cluster as TOML text (:meth:`from_toml` reads it back)."""
        lines = ["# stagewise cluster: bandwidths in bytes/s, latencies in seconds, memory in bytes per device"]
        for f in dataclasses.fields(self):
            if f.name not in ("nodes", "links"):
                lines.append(f"{f.name} = {_toml_float(getattr(self, f.name))}")
        for node in self.nodes:
            lines += ["", "[[nodes]]", f"name = {json.dumps(node.name)}", f"devices = {node.devices}",
                      f"device_kind = {json.dumps(node.device_kind)}", f"memory_bytes = {node.memory_bytes}"]
            if node.flops is not None:
                lines.append(f"flops = {_toml_float(node.flops)}")
        for link in self.links:
            lines += ["", "[[links]]", f"a = {json.dumps(link.a)}", f"b = {json.dumps(link.b)}",
                      f"bandwidth = {_toml_float(link.bandwidth)}", f"latency = {_toml_float(link.latency)}"]
            if link.allreduce_bandwidth is not None:
                lines.append(f"allreduce_bandwidth = {_toml_float(link.allreduce_bandwidth)}")
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> None:
        """Write :meth:`to_toml` to ``path``."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. runs/cluster.toml on a fresh checkout
        Path(path).write_text(self.to_toml())

    @classmethod
    def from_toml(cls, text: str, *, source: str = "cluster") -> Cluster:
        """Parse TOML text; errors name ``source`` and the offending field."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def read(cls, path: str | Path) -> Cluster:
        """Read a cluster TOML file."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"cluster file {str(p)!r} does not exist; write one with 'stagewise probe "
                                    f"--cluster {p}' or by hand (see stagewise.plan.Cluster)")
        return cls.from_toml(p.read_text(), source=str(p))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "cluster") -> Cluster:
        """Build from parsed TOML/JSON data, rejecting unknown or missing keys by name."""
        top = {f.name for f in dataclasses.fields(cls)}
        _check_keys(data, top, required={"nodes"}, where=f"{source}: top level")
        nodes = data["nodes"]
        if not isinstance(nodes, list) or not nodes:
            raise ValueError(f"{source}: 'nodes' must be a non-empty array of [[nodes]] tables")
        node_fields = {f.name for f in dataclasses.fields(Node)}
        built = []
        for i, node in enumerate(nodes):
            if not isinstance(node, dict):
                raise ValueError(f"{source}: nodes[{i}] must be a table, got {node!r}")
            _check_keys(node, node_fields, required={"name", "devices", "memory_bytes"}, where=f"{source}: nodes[{i}]")
            try:
                built.append(Node(**node))
            except ValueError as exc:
                raise ValueError(f"{source}: {str(exc).replace('node.', f'nodes[{i}].', 1)}") from None
        links = data.get("links", [])
        if not isinstance(links, list):
            raise ValueError(f"{source}: 'links' must be an array of [[links]] tables")
        link_fields = {f.name for f in dataclasses.fields(HostLink)}
        made = []
        for i, link in enumerate(links):
            if not isinstance(link, dict):
                raise ValueError(f"{source}: links[{i}] must be a table, got {link!r}")
            _check_keys(link, link_fields, required={"a", "b", "bandwidth", "latency"}, where=f"{source}: links[{i}]")
            made.append(HostLink(**link))
        try:
            return cls(nodes=built, links=made, **{k: v for k, v in data.items() if k not in ("nodes", "links")})
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def _check_keys(data: dict[str, Any], allowed: set[str], *, required: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(allowed))}")
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{where}: missing required key {missing[0]!r}")


def _toml_float(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".en") else text + ".0"
