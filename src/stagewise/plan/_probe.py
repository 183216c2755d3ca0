"""What the link probe measured (:func:`stagewise.launch.measure_links` starts the processes), and how it updates a
:class:`Cluster`: plain data in, plain data out. A :class:`Calibration` is one such measurement with where and when
it was taken: what a plan records, and what a probe file holds (``stagewise probe --json``)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ._cluster import Cluster, HostLink

__all__ = ["Calibration", "LinkMeasurement", "apply_measurement", "set_host_links"]


@dataclasses.dataclass(kw_only=True)
class LinkMeasurement:
    """What :func:`stagewise.launch.measure_links` measured between two processes."""

    latency_s: float
    """One-way seconds for a tiny message (half the median ping-pong round trip)."""
    bandwidth: float
    """Point-to-point bytes per second for a large message (latency removed)."""
    allreduce_bandwidth: float
    """Ring all-reduce bus bandwidth, bytes per second: ``2 (D-1)/D * bytes / seconds`` with D = 2 (latencies
    taken out, as :func:`~stagewise.plan.allreduce_time` adds them back)."""
    nbytes: int
    """Size of the large message and of the all-reduced tensor."""
    backend: str = "gloo"
    """torch.distributed backend used."""
    allreduce_latency_s: float | None = None
    """Seconds per ring step: half of a tiny all-reduce between the two processes (None: not measured)."""
    send_overhead_s: float | None = None
    """Seconds the sender spends posting a small transfer while its peer computes (None: not measured)."""
    recv_overhead_s: float | None = None
    """Seconds the receiver spends taking in a small transfer that was sent while it computed, the sender computing
    meanwhile too (None: not measured)."""
    action_overhead_s: float | None = None
    """Seconds the pipeline runtime adds to each compute action beyond the stage's profiled forward or backward
    (:func:`stagewise.launch.measure_action_overhead`; None: not measured)."""
    contention: float | None = None
    """How many times longer a training step (MLP forward, backward, Adam; state twice the last-level cache) takes
    on each process when both run it at once than when one runs it alone (None: not measured)."""


def apply_measurement(cluster: Cluster, measured: LinkMeasurement) -> Cluster:
    """``cluster`` with its intra-node links, all-reduce bandwidth and (where measured) all-reduce latency,
    per-transfer rank costs, per-action runtime overhead and compute contention replaced by ``measured``. Inter-node
    links cannot be measured from one machine; they are kept, but made no faster than the measured intra-node link."""
    extra = {name: value for name, value in (("allreduce_latency", measured.allreduce_latency_s),
                                              ("send_overhead", measured.send_overhead_s),
                                              ("recv_overhead", measured.recv_overhead_s),
                                              ("action_overhead", measured.action_overhead_s),
                                              ("contention", measured.contention)) if value is not None}
    return dataclasses.replace(cluster, intra_latency=measured.latency_s, intra_bandwidth=measured.bandwidth,
                               allreduce_bandwidth=measured.allreduce_bandwidth,
                               inter_latency=max(cluster.inter_latency, measured.latency_s),
                               inter_bandwidth=min(cluster.inter_bandwidth, measured.bandwidth), **extra)


def set_host_links(cluster: Cluster, measured: dict[tuple[str, str], tuple[float, float, float]]) -> Cluster:
    """``cluster`` with the links between the named node pairs set to ``measured`` (``(a, b) -> (bandwidth bytes/s,
    latency s, all-reduce bandwidth bytes/s)``, what :func:`stagewise.launch.measure_host_links` found); other links
    are kept."""
    pairs = {frozenset(pair) for pair in measured}
    kept = [link for link in cluster.links if frozenset((link.a, link.b)) not in pairs]
    made = [HostLink(a=a, b=b, bandwidth=bw, latency=lat, allreduce_bandwidth=ar)
            for (a, b), (bw, lat, ar) in measured.items()]
    return dataclasses.replace(cluster, links=kept + made)


@dataclasses.dataclass(kw_only=True)
class Calibration:
    """A :class:`LinkMeasurement` with the host and the time it was taken on: a plan records what its cost model
    was calibrated on, and a probe file (``stagewise probe --json FILE``) holds one for later plans."""

    host: str
    """The machine the figures were measured on."""
    measured_at: float
    """When: seconds since the epoch (UTC)."""
    seconds: float
    """How long measuring took."""
    figures: LinkMeasurement
    """What was measured."""
    source: str = "measured at plan time"
    """Where the plan took the figures from: measured at plan time, or the probe file's path."""

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the figures were measured."""
        return (time.time() if now is None else now) - self.measured_at

    def describe(self) -> str:
        """One line: host, UTC time, source and the figures the cost model uses most."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.measured_at))
        f = self.figures
        extra = "".join(f", {name} {value * 1e6:.0f} us" for name, value in (
            ("send", f.send_overhead_s), ("recv", f.recv_overhead_s), ("action", f.action_overhead_s))
            if value is not None)
        contention = f", contention x{f.contention:.2f}" if f.contention is not None else ""
        return (f"{self.host} at {when} ({self.source}): latency {f.latency_s * 1e6:.0f} us, bandwidth "
                f"{f.bandwidth / 1e9:.2f} GB/s{extra}{contention}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown calibration field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
        figures = data.get("figures")
        if not isinstance(figures, dict):
            raise ValueError(f"calibration.figures must be an object of measured figures, got {figures!r}")
        return cls(**{**data, "figures": LinkMeasurement(**figures)})

    def write(self, path: str | Path) -> None:
        """Write as JSON to ``path`` (a probe file)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> Calibration:
        """Read a probe file written by :meth:`write`; its ``source`` becomes the path."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read probe file {str(path)!r}: {exc}; write one with 'stagewise probe "
                             f"--json {path}'") from None
        return dataclasses.replace(cls.from_dict(data), source=str(path))
