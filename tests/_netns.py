"""Test "hosts": network namespaces joined by veth pairs to one bridge, each with its own address and loopback.

``with hosts(2) as (a, b): a.popen([...])`` runs a command inside host A (``ip netns exec``); ``b.addr`` is B's
address (10.231.0.x), ``a.iface`` the interface it reaches the others by. ``rate="200mbit"`` slows every host's
outgoing link with a token bucket (``tc ... tbf``; netem is not available on these machines). Everything is deleted
on the way out, also after a failure; :func:`netns_skip_reason` says why namespaces cannot be made here (not root,
no ``ip``), for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SUBNET = "10.231.0"
RDZV_PORT = 29400  # inside the namespaces: nothing else listens there
TBF_BURST = "32kbit"
TBF_LATENCY = "50ms"


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")


def netns_skip_reason() -> str | None:
    """Why test hosts cannot be made here, or None when they can (tries to make and delete one namespace)."""
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"swprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
    except RuntimeError as exc:
        return f"cannot make a network namespace: {exc}"
    _ip("netns", "del", name)
    return None


@dataclasses.dataclass
class Host:
    """One test host: a network namespace with an address on the shared bridge."""

    name: str
    """The namespace (``ip netns exec NAME``)."""
    addr: str
    iface: str
    """The interface inside the namespace that reaches the other hosts (for GLOO_SOCKET_IFNAME / --iface)."""
    procs: list[subprocess.Popen[Any]] = dataclasses.field(default_factory=list)

    def command(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in this host, in a session of its own (killed, with its children, on the way out)."""
        proc = subprocess.Popen(self.command(cmd), start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, cmd: Sequence[str], *, timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.command(cmd), timeout=timeout, **kwargs)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@contextlib.contextmanager
def hosts(n: int, *, rate: str | None = None) -> Iterator[list[Host]]:
    """``n`` hosts (2..9) on one bridge; every link limited to ``rate`` (e.g. ``"200mbit"``) when given."""
    if not 2 <= n <= 9:
        raise ValueError(f"make 2 to 9 test hosts, not {n}")
    tag = uuid.uuid4().hex[:6]
    switch = f"sw{tag}"
    made: list[str] = []
    out: list[Host] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("link", "add", "br0", "type", "bridge", netns=switch)
        _ip("link", "set", "br0", "up", netns=switch)
        for i in range(n):
            name = f"h{i}{tag}"
            _ip("netns", "add", name)
            made.append(name)
            inner, outer = f"eth{i}", f"p{i}{tag}"
            _ip("link", "add", inner, "netns", name, "type", "veth", "peer", "name", outer, "netns", switch)
            _ip("link", "set", outer, "master", "br0", netns=switch)
            _ip("link", "set", outer, "up", netns=switch)
            addr = f"{SUBNET}.{i + 1}"
            _ip("addr", "add", f"{addr}/24", "dev", inner, netns=name)
            _ip("link", "set", inner, "up", netns=name)
            _ip("link", "set", "lo", "up", netns=name)
            if rate is not None:
                cmd = ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", inner, "root", "tbf", "rate", rate,
                       "burst", TBF_BURST, "latency", TBF_LATENCY]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
            out.append(Host(name=name, addr=addr, iface=inner))
        yield out
    finally:
        for host in out:
            host.kill_all()
        for name in reversed(made):  # deleting a namespace deletes its ends of the veth pairs
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip("netns", "del", name)


def torchrun_line(host: Host, node: int, *, rdzv: Host, nnodes: int, nproc: int, args: Sequence[str]) -> list[str]:
    """The torchrun line a user types on ``host`` to run ``stagewise ARGS``: c10d rendezvous on ``rdzv``, which serves
    its store (``is_host``: a namespace's address is not its host name's, by which torchrun would otherwise decide),
    ``--iface`` naming the host's link."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rdzv.addr}:{RDZV_PORT}",
            "--rdzv-id", "stagewise-test", "--rdzv-conf", f"is_host={int(host is rdzv)}", "--local-addr", host.addr,
            "-m", "stagewise.cli", *args, "--iface", host.iface]


def torchrun_everywhere(hosts_: Sequence[Host], *, nproc: int, args: Sequence[str], logs: Sequence[Path],
                        env: Mapping[str, str], timeout: float) -> list[str]:
    """Run ``stagewise ARGS`` with torchrun on every host (the first serves the rendezvous), each writing its log;
    the logs once every torchrun exited 0, else an AssertionError with their ends."""
    procs = []
    for node, (host, log) in enumerate(zip(hosts_, logs)):
        with log.open("w") as f:
            cmd = torchrun_line(host, node, rdzv=hosts_[0], nnodes=len(hosts_), nproc=nproc, args=args)
            procs.append(host.popen(cmd, env=dict(env), stdout=f, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun did not finish in {timeout:g} s:\n{log.read_text()[-3000:]}") from None
    text = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(t[-3000:] for t in text)
    return text
