"""``--launcher ray``: ranks as Ray actors on a local Ray cluster this module starts (on the loopback, with CPUs that
stand for more than this machine has), trained exactly as local processes train; a rank process killed from outside
is a lost actor, and ``--max-restarts`` takes the run on from its newest snapshot to the same weights, bit for bit."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stagewise.comm import SpawnError
from stagewise.train import TrainConfig, Trainer

ray = pytest.importorskip("ray", reason="Ray is the optional extra stagewise[ray]")

pytestmark = pytest.mark.timeout(600)

BASE = TrainConfig(model="stagewise.zoo.gpt:tiny_gpt", stages=2, replicas=2, microbatches=2, steps=30,
                   global_batch=8, progress=False, log_every=0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _rank_actors() -> list[int]:
    """Pids of the processes running a rank (Ray titles an actor's process after its class)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::_Rank"):
                found.append(int(entry))
    return sorted(found)


def test_ray_ranks_train_exactly_and_a_lost_actor_restarts_the_run(tmp_path: Path, cluster: None) -> None:
    reference = Trainer(BASE).fit()  # local processes
    config = dataclasses.replace(BASE, launcher="ray", save_dir=str(tmp_path), max_restarts=1, snapshot_every=10)
    killed: list[int] = []

    def saboteur() -> None:
        deadline = time.monotonic() + 300
        while not (tmp_path / "step-00000010" / "manifest.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        ranks = _rank_actors()
        if len(ranks) == BASE.world_size:
            os.kill(ranks[1], signal.SIGKILL)
            killed.append(ranks[1])

    thread = threading.Thread(target=saboteur, daemon=True)
    thread.start()
    result = Trainer(config).fit()
    thread.join(10)
    assert killed, "the rank actors were not found to kill one"
    assert result.restarts == 1, result.failures
    assert " lost: its Ray actor died" in result.failures[0], result.failures
    assert result.losses == reference.losses
    ours, theirs = result.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name
    deadline = time.monotonic() + 15  # ray.kill ends the actors' processes in the background
    while _rank_actors() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _rank_actors(), "rank actors outlived the run"


def test_a_rank_that_raises_is_reported_with_its_traceback(cluster: None) -> None:
    import sys

    from stagewise.launch import ray_spawn

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    with pytest.raises(SpawnError) as caught:
        ray_spawn(_fail_on_rank_one, 2, timeout=120)
    assert list(caught.value.failures) == [1]
    assert "ValueError: rank 1 refuses" in caught.value.failures[1]
    assert str(caught.value).startswith("ray: rank 1 failed: ValueError: rank 1 refuses"), str(caught.value)


def _fail_on_rank_one(rank: int, world_size: int, port: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 refuses")


def test_ray_serves_and_a_killed_worker_actor_loses_no_request(cluster: None) -> None:
    from serve_load import MODEL, Load, kill_under_load

    from stagewise._procs import running
    from stagewise.serve import GatewayConfig, PipelineBackend, create_app, serve_app

    backend = PipelineBackend(MODEL, stages=2, replicas=2, max_batch_size=4, launcher="ray", restart_backoff_s=0.1)
    try:
        backend.wait_ready(240, replicas=2)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config(max_delay_ms=2)))
        with serve_app(app) as server, Load(server.url) as load:
            victim = backend.status()[0]
            assert len(victim.pids) == 2 and all(running(p) for p in victim.pids), victim
            assert all(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::_Stage") for p in victim.pids)
            cause = kill_under_load(backend, load, lambda: os.kill(victim.pids[1], signal.SIGKILL), back_s=240)
    finally:
        backend.shutdown()
    load.check()
    assert "stage 1" in cause, cause  # its channel closed, or its actor was seen dead: whichever came first
