"""Training across hosts: torchrun on two network namespaces ("hosts" joined by a bridge, see ``_netns``) trains the
tiny GPT with 2 stages x 2 replicas exactly as one process does; a host that cannot reach the rendezvous says which
host, port and interface it tried."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from _netns import RDZV_PORT, Host, hosts, netns_skip_reason, torchrun_everywhere

from stagewise.plan import Cluster, Node
from stagewise.train import TrainConfig, train_reference

RTOL, ATOL = 1e-5, 4e-5
SRC = Path(__file__).resolve().parent.parent / "src"
WAIT_S = 300

_skip = netns_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=f"no test hosts: {_skip}")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))


@pytest.mark.parametrize("rank_order", ["pipelines", "stages"])
def test_torchrun_on_two_hosts_matches_single_process(tmp_path: Path, rank_order: str) -> None:
    """``stages``: each host runs one stage of both replicas (the gradient all-reduce stays on the host, the
    activations cross); ``pipelines``: each host runs one whole replica."""
    out = tmp_path / "out"
    model = "stagewise.zoo.gpt:tiny_gpt"
    config = TrainConfig(model=model, stages=2, replicas=2, steps=3, global_batch=8, microbatches=2, dropout=False)
    args = ["train", model, "--stages", "2", "--replicas", "2", "--steps", "3", "--global-batch", "8",
            "--microbatches", "2", "--no-dropout", "--no-progress", "--out", str(out), "--verbose",
            "--rank-order", rank_order]
    logs = [tmp_path / f"host{i}.log" for i in range(2)]
    with hosts(2) as (a, b):
        text = _torchrun_everywhere((a, b), nproc=2, args=args, logs=logs)
    # one capture in the whole job: rank 0's, whichever host it landed on; the three other ranks read their stages
    assert sum(t.count("capturing GPT.forward") for t in text) == 1, text
    assert sum(t.count("from rank 0 (") for t in text) == 3
    summary = json.loads((out / "summary.json").read_text())
    ref_losses, ref_state = train_reference(config)
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    from safetensors.torch import load_file

    state = {**load_file(str(out / "stage0.safetensors")), **load_file(str(out / "stage1.safetensors"))}
    params = {name for name, _ in train_reference_params(config)}
    assert params <= set(state), sorted(params - set(state))[:5]
    for name, value in state.items():
        torch.testing.assert_close(value, ref_state[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def _torchrun_everywhere(hosts_: tuple[Host, ...], *, nproc: int, args: list[str], logs: list[Path]) -> list[str]:
    return torchrun_everywhere(hosts_, nproc=nproc, args=args, logs=logs, env=_env(), timeout=WAIT_S)


def test_probe_measures_the_link_between_two_hosts(tmp_path: Path) -> None:
    """Each host's outgoing link limited to 200 Mbit/s (25 MB/s): the probe writes about that into the cluster."""
    path = tmp_path / "cluster.toml"
    Cluster(nodes=[Node(name=f"host-{x}", devices=2, memory_bytes=2**30) for x in "ab"]).write(path)
    args = ["probe", "--hosts", "--cluster", str(path), "--bytes", str(2 * 2**20), "--repeats", "3"]
    with hosts(2, rate="200mbit") as (a, b):
        text = _torchrun_everywhere((a, b), nproc=1, args=args, logs=[tmp_path / "a.log", tmp_path / "b.log"])
    assert "host-a - host-b: bandwidth" in text[0] + text[1]
    (link,) = Cluster.read(path).links
    assert (link.a, link.b) == ("host-a", "host-b")
    assert 0.3 * 25e6 < link.bandwidth < 1.2 * 25e6, link
    assert 0 < link.latency < 0.05
    assert link.allreduce_bandwidth is not None and 0 < link.allreduce_bandwidth < 1.2 * 25e6


def train_reference_params(config: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    from stagewise.train._rank import load_train_spec

    return list(load_train_spec(config).model.named_parameters())  # a tied weight once, by its first name


def test_a_host_that_cannot_reach_the_rendezvous_names_host_port_and_interface(tmp_path: Path) -> None:
    """What torchrun (or a Kubeflow PyTorchJob) sets, with nobody serving the store on host A."""
    args = [sys.executable, "-m", "stagewise.cli", "train", "stagewise.zoo.gpt:tiny_gpt", "--stages", "2",
            "--timeout", "3", "--no-progress"]
    with hosts(2) as (a, b):
        env = dict(_env(), RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR=a.addr,
                   MASTER_PORT=str(RDZV_PORT))
        done = b.run([*args, "--iface", b.iface], env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"could not join the job through the rendezvous at {a.addr}:{RDZV_PORT} using interface " \
               f"{b.iface} ({b.addr}) within 3 s" in done.stderr, done.stderr[-3000:]
        assert "rank 1 on host" in done.stderr and "name the interface" in done.stderr
        wrong = b.run([*args, "--iface", "wlan9"], env=env, capture_output=True, text=True, timeout=WAIT_S)
        assert wrong.returncode == 2
        assert "--iface wlan9: this host" in wrong.stderr and f"has no such network interface; it has lo, " \
               f"{b.iface}" in wrong.stderr, wrong.stderr[-2000:]
