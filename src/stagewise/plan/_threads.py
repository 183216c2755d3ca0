"""How many compute threads each training process gets: the host's cores shared out among the ranks placed there."""

from __future__ import annotations

from ._cluster import Cluster

__all__ = ["auto_threads"]


def auto_threads(cluster: Cluster, devices: int, *, local_cores: int) -> int:
    """Compute threads per rank when ``devices`` ranks run on ``cluster`` (its first ``devices`` devices, one rank
    each): on every node used, its cores divided by the ranks placed there, the least over those nodes (one
    setting serves every rank). A CPU node's devices are its cores; a GPU node's cores are not in the cluster file,
    so they are taken to be ``local_cores`` (this machine's). At least 1.

    >>> from stagewise.plan import Node
    >>> auto_threads(Cluster(nodes=[Node(name="a", devices=32, memory_bytes=1)]), 4, local_cores=32)
    8
    """
    if devices < 1 or local_cores < 1:
        raise ValueError(f"devices and local_cores must be >= 1, got {devices} and {local_cores}")
    used = cluster.take(devices)
    best = None
    for node, full in zip(used.nodes, cluster.nodes):
        cores = full.devices if full.device_kind == "cpu" else local_cores
        share = max(1, cores // node.devices)
        best = share if best is None else min(best, share)
    assert best is not None
    return best
