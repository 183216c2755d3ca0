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
    import httpx
    import numpy as np

    from stagewise._procs import running
    from stagewise._spec import load_model_spec
    from stagewise.serve import GatewayConfig, PipelineBackend, create_app, serve_app

    model = load_model_spec("stagewise.zoo.basic:large_model").model.eval()
    backend = PipelineBackend("stagewise.zoo.basic:large_model", stages=2, replicas=2, max_batch_size=4,
                              launcher="ray", restart_backoff_s=0.1)
    answers: list[bool] = []
    errors: list[str] = []
    stop = threading.Event()
    cause = ""
    try:
        backend.wait_ready(240, replicas=2)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config(max_delay_ms=2)))
        with serve_app(app) as server:
            def client(i: int) -> None:
                rng = np.random.default_rng(i)
                with httpx.Client(timeout=120) as c:
                    while not stop.is_set():
                        x = rng.standard_normal((2, 10)).astype(np.float32)
                        body = {"inputs": [{"name": "arg0", "datatype": "FP32", "shape": [2, 10],
                                            "data": x.reshape(-1).tolist()}]}
                        resp = c.post(f"{server.url}/v2/models/large_model/infer", json=body)
                        if resp.status_code != 200:
                            errors.append(resp.text)
                            continue
                        got = np.asarray(resp.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, -1)
                        with torch.no_grad():
                            answers.append(bool(np.allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5)))

            threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            try:
                _wait(lambda: len(answers) >= 10, 60, "answers before the kill")
                victim = backend.status()[0]
                assert len(victim.pids) == 2 and all(running(p) for p in victim.pids), victim
                assert all(Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"ray::_Stage") for p in victim.pids)
                os.kill(victim.pids[1], signal.SIGKILL)
                _wait(lambda: backend.status()[0].generation > victim.generation, 30, "replica 0 to be taken down")
                cause = backend.status()[0].last_error or ""
                before = len(answers)
                _wait(lambda: len(answers) >= before + 10, 60, "answers while replica 0 restarts")
                _wait(lambda: backend.status()[0].state == "ready", 240, "replica 0 to come back on new actors")
            finally:
                stop.set()
                for t in threads:
                    t.join(120)
    finally:
        backend.shutdown()
    assert not errors, errors[:3]
    assert answers and all(answers), f"{answers.count(False)} wrong answers of {len(answers)}"
    assert "stage 1" in cause, cause  # its channel closed, or its actor was seen dead: whichever came first


def _wait(cond, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
