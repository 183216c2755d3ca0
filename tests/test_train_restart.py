"""Training survives failures (--max-restarts): a rank killed (SIGKILL) or stopped (SIGSTOP) from outside mid-run,
the run restarts from its newest snapshot and ends with the weights of a run nothing happened to, bit for bit."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from stagewise._procs import grandchildren
from stagewise.comm import SpawnError
from stagewise.train import TrainConfig, Trainer, TrainResult

BASE = TrainConfig(model="stagewise.zoo.gpt:tiny_gpt", stages=2, replicas=2, microbatches=2, steps=100,
                   global_batch=8, progress=False, log_every=0)  # dropout on: every rank's RNG must resume too


@pytest.fixture(scope="module")
def reference() -> TrainResult:
    return Trainer(BASE).fit()


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Saboteur(threading.Thread):
    """Sends ``sig`` to one rank each time the run commits the snapshot of one of ``steps`` (in order)."""

    def __init__(self, root: Path, steps: list[int], victims: list[int], sig: signal.Signals) -> None:
        super().__init__(daemon=True)
        self.root, self.steps, self.victims, self.sig = root, steps, victims, sig
        self.hits: list[tuple[int, float]] = []  # (pid, time.time() it was sent)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for step, victim in zip(self.steps, self.victims, strict=True):
                _wait_for(lambda s=step: (self.root / f"step-{s:08d}" / "manifest.json").is_file(),
                          f"the snapshot of step {step}")
                ranks = grandchildren(os.getpid())
                assert len(ranks) == BASE.world_size, ranks
                os.kill(ranks[victim], self.sig)
                self.hits.append((ranks[victim], time.time()))
                _wait_for(lambda pid=ranks[victim]: pid not in grandchildren(os.getpid()), "the rank's end")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _assert_same(result: TrainResult, reference: TrainResult) -> None:
    assert result.losses == reference.losses  # every step's loss, the lost ones recomputed identically
    ours, theirs = result.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


def test_killed_ranks_restart_from_the_newest_snapshot_bitwise(tmp_path: Path, reference: TrainResult,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    config = dataclasses.replace(BASE, save_dir=str(tmp_path), max_restarts=3, snapshot_every=20)
    saboteur = Saboteur(tmp_path, steps=[20, 60], victims=[1, 2], sig=signal.SIGKILL)
    saboteur.start()
    with caplog.at_level(logging.WARNING, logger="stagewise.train"):
        result = Trainer(config).fit()
    saboteur.join(timeout=10)
    assert saboteur.error is None, saboteur.error
    assert result.restarts == 2, result.failures
    assert [f.split(" without")[0] for f in result.failures] == ["rank 1 killed by signal SIGKILL",
                                                                 "rank 2 killed by signal SIGKILL"], result.failures
    warnings = [r.getMessage() for r in caplog.records if "restart" in r.getMessage()]
    assert len(warnings) == 2, warnings
    for n, (rank, line) in enumerate(zip([1, 2], warnings, strict=True)):
        assert line.startswith(f"restart {n + 1} of 3: rank {rank} killed by signal SIGKILL"), line
        step = int(line.rsplit("restarting from step ", 1)[1])
        assert step >= [20, 60][n] and step % 20 == 0, line  # the newest snapshot: at most 20 steps lost
    _assert_same(result, reference)


def test_a_stopped_rank_is_caught_by_the_heartbeat(tmp_path: Path, reference: TrainResult,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    heartbeat = 2.0  # far below --timeout: the heartbeat, not a peer's wait, catches it
    config = dataclasses.replace(BASE, save_dir=str(tmp_path), max_restarts=1, snapshot_every=20,
                                 heartbeat_timeout=heartbeat, timeout=60.0, trace=str(tmp_path / "trace"))
    saboteur = Saboteur(tmp_path, steps=[20], victims=[3], sig=signal.SIGSTOP)
    saboteur.start()
    try:
        with caplog.at_level(logging.WARNING, logger="stagewise.train"):
            result = Trainer(config).fit()
        saboteur.join(timeout=10)
    finally:
        for pid, _ in saboteur.hits:  # never leave a stopped process behind, whatever happened
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert saboteur.error is None, saboteur.error
    assert result.restarts == 1, result.failures
    assert result.failures[0].startswith(f"rank 3 sent no heartbeat for {heartbeat:.1f} s "
                                         "(its process is stopped: SIGSTOP or a debugger)"), result.failures
    warning = next(r for r in caplog.records if "restart" in r.getMessage())
    detected = warning.created - saboteur.hits[0][1]
    assert 0 < detected < heartbeat + 2.0, detected  # polled twice a second, beats five times per heartbeat
    _assert_same(result, reference)
    # the restart is marked in the trace, before every event of the attempt that finished the run
    events = json.loads((tmp_path / "trace" / "trace.json").read_text())["traceEvents"]
    marks = [e for e in events if e.get("cat") == "marker"]
    assert [m["args"]["cause"] for m in marks] == result.failures, marks
    assert marks[0]["name"] == f"restart 1: {result.failures[0]}" and marks[0]["ph"] == "i"
    assert f"restarting from step {marks[0]['args']['from_step']}" in warning.getMessage()
    assert marks[0]["ts"] < min(e["ts"] for e in events if e["ph"] == "X")


def test_exhausted_restarts_name_every_failure(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, save_dir=str(tmp_path), max_restarts=1, snapshot_every=20)
    saboteur = Saboteur(tmp_path, steps=[20, 40], victims=[0, 3], sig=signal.SIGKILL)
    saboteur.start()
    with pytest.raises(SpawnError) as caught:
        Trainer(config).fit()
    saboteur.join(timeout=10)
    assert saboteur.error is None, saboteur.error
    message = str(caught.value)
    assert message.startswith("training failed 2 times, more than --max-restarts 1 allows: "
                              "1) rank 0 killed by signal SIGKILL"), message
    assert "2) rank 3 killed by signal SIGKILL" in message, message
    assert "fix the cause or raise --max-restarts" in message


def test_failure_cause_is_one_line_naming_the_rank() -> None:
    from stagewise.train._recovery import failure_cause

    raised = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nRuntimeError: out of data\n"
    assert failure_cause(SpawnError("x", failures={1: raised, 0: "later"}, timed_out=False)) == \
        "rank 1 failed: RuntimeError: out of data"
    killed = "rank 2 killed by signal SIGKILL without reporting a traceback\nmore"
    assert failure_cause(SpawnError("x", failures={2: killed}, timed_out=False)) == \
        "rank 2 killed by signal SIGKILL without reporting a traceback"


def test_torchrun_restarts_resume_from_the_newest_checkpoint(tmp_path: Path) -> None:
    """torchrun --max-restarts 1: a rank killed after the step-10 checkpoint; torchrun restarts every worker, which go
    on from that checkpoint by themselves and end with the weights of a run nothing happened to."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from stagewise._procs import live_children
    from stagewise.comm import find_free_port
    from stagewise.train import train_reference

    out, save = tmp_path / "out", tmp_path / "save"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()), "-m", "stagewise.cli", "train",
           "stagewise.zoo.basic:large_model", "--stages", "2", "--steps", "30", "--global-batch", "16",
           "--microbatches", "4", "--no-dropout", "--save", str(save), "--save-every", "10", "--out", str(out)]
    log_path = tmp_path / "torchrun.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for(lambda: (save / "step-00000010" / "manifest.json").is_file() or proc.poll() is not None,
                      "the checkpoint of step 10", timeout=180)
            workers = live_children().get(proc.pid, [])
            assert len(workers) == 2, (workers, log_path.read_text()[-3000:])
            os.kill(workers[1], signal.SIGKILL)
            code = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "torchrun restart 1: resuming from" in text, text[-3000:]
    config = TrainConfig(model="stagewise.zoo.basic:large_model", stages=2, steps=30, global_batch=16,
                         microbatches=4, dropout=False)
    _, ref_state = train_reference(config)
    state = {**load_file(str(out / "stage0.safetensors")), **load_file(str(out / "stage1.safetensors"))}
    assert state.keys() <= ref_state.keys() and state
    for name, value in state.items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-5, atol=4e-5)
