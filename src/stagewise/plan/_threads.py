"""How many compute threads each training process gets: the host's cores shared out among the ranks placed there."""

from __future__ import annotations

from ._cluster import Cluster, local_cores

__all__ = ["auto_threads"]


def auto_threads(cluster: Cluster, devices: int, *, cores: int | None = None) -> int:
    """Compute threads per rank when ``devices`` ranks run on ``cluster`` (its first ``devices`` devices, one rank
    each): on every node used, its cores divided by the ranks placed there, the least over those nodes (one
    setting serves every rank). A CPU node's devices are its cores; a GPU node's cores are not in the cluster file,
    so they are taken to be ``cores`` (default: this machine's). At least 1.

    >>> from stagewise.plan import Node
    >>> auto_threads(Cluster(nodes=[Node(name="a", devices=32, memory_bytes=1)]), 4)
    8
    """
    gpu_cores = local_cores() if cores is None else cores
    if devices < 1 or gpu_cores < 1:
        raise ValueError(f"devices and cores must be >= 1, got {devices} and {gpu_cores}")
    used = cluster.take(devices)
    best = None
    for node, full in zip(used.nodes, cluster.nodes):
        share = max(1, (full.devices if full.device_kind == "cpu" else gpu_cores) // node.devices)
        best = share if best is None else min(best, share)
    assert best is not None
    return best
