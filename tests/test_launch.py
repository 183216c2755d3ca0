"""The launch package: torchrun detection, the rendezvous store's address, stopping a training run by signal, and
plan/ staying pure (it starts no process and imports none of the packages that do)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stagewise import launch
from stagewise._procs import descendants, grandchildren, running
from stagewise.comm import DistTransport, find_free_port
from stagewise.launch import TorchrunEnv, spawn, torchrun_env

SRC = Path(__file__).resolve().parent.parent / "src"


def test_public_surface() -> None:
    assert set(launch.__all__) >= {"spawn", "stop_requested", "torchrun_env", "TorchrunEnv", "connect_torchrun",
                                   "measure_links", "time_optimizer", "profile_model", "forkserver_context",
                                   "describe_exit", "SpawnError"}
    for name in launch.__all__:
        assert hasattr(launch, name), name


def test_torchrun_env_is_read_only_when_asked_and_typed() -> None:
    assert torchrun_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}) is None  # no MASTER_PORT: not torchrun
    env = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
                        "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert env == TorchrunEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, master_addr="h",
                              master_port=29500)
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE"):
        torchrun_env({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29500"})
    with pytest.raises(ValueError, match="torchrun environment is not valid"):
        torchrun_env({"RANK": "x", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29500"})


def test_plan_imports_no_package_that_starts_processes() -> None:
    banned = {"train", "comm", "runtime", "launch", "serve"}
    for path in sorted((SRC / "stagewise" / "plan").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1 and node.module:
                top = node.module.split(".")[0] if node.level == 2 else None
                assert top not in banned, f"{path.name} imports stagewise.{node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    parts = name.split(".")
                    assert not (parts[0] == "stagewise" and len(parts) > 1 and parts[1] in banned), (path.name, name)


# --- Item 5: the rendezvous store listens on the run's address only


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc shows them) listening on TCP ``port`` in this network namespace."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(address)
    return found


def _store_rank(rank: int, world_size: int, port: int, out: str) -> None:
    transport = DistTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=20.0)
    try:
        if rank == 0:
            Path(out).write_text(",".join(_listeners(port)))
        transport.barrier()
    finally:
        transport.close()


def test_rendezvous_store_listens_on_loopback_only(tmp_path: Path) -> None:
    out = tmp_path / "listeners.txt"
    port = find_free_port()
    spawn(_store_rank, 2, args=(str(out),), port=port, timeout=60.0)
    listeners = out.read_text().split(",")
    assert listeners == ["0100007F"], f"port {port} listened on {listeners}; 0100007F is 127.0.0.1 only"


# --- Item 6: SIGTERM / SIGINT of the `stagewise train` launcher stops every rank and leaves nothing behind


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_rank_with_a_checkpoint_and_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "stagewise.cli", "train", "stagewise.zoo.basic:mlp", "--stages", "2", "--steps",
           "100000", "--global-batch", "16", "--save", str(save), "--save-every", "50", "--keep", "2",
           "--timeout", "10"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "train.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not list(save.glob("step-*[0-9]")):  # mid-run: a first checkpoint was committed
            assert time.monotonic() < deadline, "training did not reach its first checkpoint"
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            seen |= set(descendants(proc.pid))
            time.sleep(0.2)
        seen |= set(descendants(proc.pid))
        assert len(seen) >= 3, seen  # the forkserver and two ranks at least
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
    text = (tmp_path / "train.log").read_text()
    assert code == 128 + sig, text[-3000:]
    assert "\x1b" not in text and "Traceback" not in text  # piped: no live bar (it is on by default), no colour
    line = next(ln for ln in text.splitlines() if "stopped at step" in ln)
    step = int(line.split("stopped at step ")[1].split()[0])
    assert f"{sig.name}: stopped at step {step} of 100000 (checkpoint at {save / f'step-{step:08d}'})" in line
    assert (save / f"step-{step:08d}" / "manifest.json").is_file(), sorted(p.name for p in save.iterdir())
    end = time.monotonic() + 10
    while any(running(p) for p in seen) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [p for p in seen if running(p)], "processes of the run outlived it"


# --- Item 7: a rank that stops (SIGSTOP) is the one the timeout names, not the rank waiting for it


@pytest.mark.parametrize("victim", [0, 1])
def test_timeout_names_the_rank_that_stopped(tmp_path: Path, victim: int) -> None:
    cmd = [sys.executable, "-m", "stagewise.cli", "train", "stagewise.zoo.basic:mlp", "--stages", "2", "--steps",
           "100000", "--global-batch", "16", "--timeout", "3"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "train.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stopped = None
        try:
            deadline = time.monotonic() + 120
            while "step 20/" not in log_path.read_text():
                assert time.monotonic() < deadline, "training did not start"
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
            ranks = grandchildren(proc.pid)  # the forkserver's children
            assert len(ranks) == 2, ranks
            stopped = ranks[victim]
            os.kill(stopped, signal.SIGSTOP)
            code = proc.wait(timeout=60)
        finally:
            if stopped is not None and running(stopped):
                os.kill(stopped, signal.SIGKILL)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    text = log_path.read_text()
    assert code == 2, text[-3000:]
    error = next(ln for ln in text.splitlines() if ln.startswith("stagewise train: error:"))
    waiter = 1 - victim
    # The launcher sees which rank is stopped; the executor names the peer a transfer waited for. Which of the two
    # the waiting rank was in (a pipeline transfer, or the step's all-reduce) depends on when the signal landed.
    assert error.startswith(f"stagewise train: error: spawn: ranks [{victim}] were stopped (SIGSTOP or a debugger) "
                            f"and the others timed out waiting: rank {waiter} failed"), error
    if "StepError" in error:
        assert f"StepError: rank {victim} (stage {victim}) stopped answering: rank {waiter}, stage {waiter}" in error
        assert "waited 3.0 s" in error


def test_step_error_leads_with_the_peer_a_transfer_waited_for() -> None:
    import torch

    from stagewise.comm import LocalHub
    from stagewise.runtime import PipelineExecutor, StepError
    from stagewise.schedule import add_communication, build
    from stagewise.split import split

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    sm = split(model, (torch.randn(2, 4),), stages=2)
    name = next(iter(sm.stages[0].spec.inputs))
    executor = PipelineExecutor(stages={0: sm.stages[0]}, schedule=add_communication(build("1f1b", ranks=2,
                                                                                             microbatches=1)),
                                transport=LocalHub(2, timeout=0.5).transport(0), peers=[0, 1], num_stages=2,
                                loss_fn=None, timeout=0.5)
    with pytest.raises(StepError) as ei:  # rank 1 never runs: rank 0 waits for stage 1's gradient
        executor.run([{name: torch.randn(2, 4)}])
    assert ei.value.peer == 1
    assert str(ei.value).startswith("rank 1 (stage 1) stopped answering: rank 0, stage 0, action 0RECV_B0 "
                                    "(microbatch 0) waited 0.5 s to receive from it"), str(ei.value)
