"""Running the `stagewise` command line as a user does: a real subprocess of this checkout, in a directory of theirs.

Shared by the tests that reproduce what a user typed (README blocks, the first hour with their own model).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 300
READY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment whose PATH has a ``stagewise`` that runs this checkout, then the venv's scripts (``torchrun``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "stagewise"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m stagewise.cli "$@"\n')
    shim.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_ok(cmd: str, cwd: Path, env: dict[str, str], what: str = "") -> subprocess.CompletedProcess[str]:
    """Run a shell command line; fail with its output unless it exits 0."""
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, \
        f"{what or cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _wait_ready(proc: subprocess.Popen[str], port: int, log: Path, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} was not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def serving(cmd: str, port: int, cwd: Path, env: dict[str, str], what: str = "") -> Iterator[Path]:
    """Run ``cmd`` (a `stagewise serve` line on ``port``) until /v2/health/ready answers; stop it on exit.

    Yields its log file (stdout and stderr: a file, not a pipe, so a chatty server never blocks on a full pipe)."""
    log = cwd / f"serve_{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=cwd, env=env, text=True, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, port, log, what or cmd)
        yield log
    finally:
        _stop(proc)
