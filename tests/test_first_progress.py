"""A new user's first hour (issue 13, item 8): live progress on a terminal, plain output when piped, and Ctrl-C is
one line (where training stopped; "interrupted" for plan and probe; "stopped" for serve), never a traceback.

A terminal is a real pseudo-terminal on the command's stderr; Ctrl-C is SIGINT to the command's whole process group,
as a terminal sends it."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stagewise._procs import group_members

SRC = str(Path(__file__).resolve().parents[1] / "src")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """``python -m stagewise.cli ARGV`` with stderr on a pseudo-terminal (read by a thread), stdout to a file."""

    def __init__(self, *argv: str, cwd: Path) -> None:
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TERM": "xterm-256color", "COLUMNS": "160",
               "PYTHONUNBUFFERED": "1"}
        master, slave = pty.openpty()
        self._stdout_path = cwd / "stdout.txt"
        self._stdout = open(self._stdout_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "stagewise.cli", *argv], cwd=cwd, env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=slave,
                                     start_new_session=True)
        os.close(slave)
        self._master, self._raw = master, bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            self._raw += chunk

    @property
    def screen(self) -> str:
        """Everything written to the terminal, escape sequences removed."""
        return ANSI.sub("", bytes(self._raw).decode("utf-8", "replace"))

    @property
    def stdout(self) -> str:
        return self._stdout_path.read_text()

    def wait_for(self, ready: Callable[[str], bool], what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready(self.screen):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n{self.screen[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout_s} s:\n{self.screen[-3000:]}"
            time.sleep(0.1)

    def ctrl_c(self, timeout_s: float = 60) -> tuple[int, float]:
        """SIGINT to the process group; returns the exit code and the seconds it took to exit."""
        start = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(timeout=timeout_s)
        return code, time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reader.join(5)
        os.close(self._master)
        self._stdout.close()

    def last_line(self) -> str:
        lines = [ln.strip() for ln in self.screen.replace("\r", "\n").splitlines() if ln.strip()]
        return lines[-1] if lines else ""


def _nothing_left(pgid: int) -> None:
    end = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < end:
        time.sleep(0.1)
    assert not group_members(pgid), "processes of the command outlived it"


def test_train_bar_on_a_terminal_then_ctrl_c_says_where_it_stopped(tmp_path: Path) -> None:
    term = Terminal("train", "stagewise.zoo.basic:mlp", "--stages", "2", "--steps", "100000", "--global-batch",
                    "16", "--timeout", "10", cwd=tmp_path)
    try:
        # the live bar: done/total, loss and steps/s, on stderr
        term.wait_for(lambda s: re.search(r"\b[1-9]\d*/100000 loss \d+\.\d{4} \d+\.\d+ steps/s", s) is not None,
                      "progress bar with a step done")
        code, took = term.ctrl_c()
        screen = term.screen
    finally:
        term.close()
    assert code == 130, screen[-3000:]
    assert "Traceback" not in screen
    line = term.last_line()
    step = re.fullmatch(r"stagewise train: SIGINT: stopped at step (\d+) of 100000 "
                        r"\(no checkpoint: pass --save DIR to keep one\)", line)
    assert step is not None and int(step.group(1)) >= 1, line
    assert took < 30
    assert "step " not in term.stdout and "\x1b" not in term.stdout  # the bar replaced the plain lines, on stderr
    _nothing_left(term.proc.pid)


SLOW_MODEL = textwrap.dedent('''
    import time

    import torch
    from torch import nn


    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x


    def slow():
        return nn.Sequential(nn.Linear(4, 4), Slow(), nn.Linear(4, 2)), torch.randn(4, 4)
''')


def test_plan_shows_its_phases_and_ctrl_c_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(SLOW_MODEL)
    term = Terminal("plan", f"{tmp_path / 'slow.py'}:slow", "--repeats", "200", cwd=tmp_path)
    try:
        term.wait_for(lambda s: "stagewise plan: profiling every unit" in s, "the profiling phase")
        code, took = term.ctrl_c()
        screen = term.screen
    finally:
        term.close()
    assert (code, term.last_line()) == (130, "stagewise plan: interrupted"), screen[-3000:]
    assert "Traceback" not in screen and took < 10
    _nothing_left(term.proc.pid)


def test_probe_ctrl_c_kills_its_processes_at_once_and_writes_nothing(tmp_path: Path) -> None:
    cluster = tmp_path / "mine.toml"
    term = Terminal("probe", "--cluster", str(cluster), "--repeats", "100000", "--timeout", "300", cwd=tmp_path)
    try:
        term.wait_for(lambda s: "stagewise probe: measuring links" in s, "the measuring phase")
        deadline = time.monotonic() + 60
        while len(group_members(term.proc.pid)) < 4:  # the command, the forkserver, both probe ranks
            assert time.monotonic() < deadline and term.proc.poll() is None, term.screen[-3000:]
            time.sleep(0.1)
        code, took = term.ctrl_c()
        screen = term.screen
    finally:
        term.close()
    # without the kill, the ranks would go on measuring (they never ask to stop) for their 30 s grace
    assert (code, term.last_line()) == (130, "stagewise probe: interrupted (stopped by SIGINT)"), screen[-3000:]
    assert "Traceback" not in screen and took < 10
    assert not cluster.exists()
    _nothing_left(term.proc.pid)


def test_serve_shows_start_up_phases_and_ctrl_c_while_starting_is_one_line(tmp_path: Path) -> None:
    term = Terminal("serve", "stagewise.zoo.basic:mlp", "--port", "0", "--stages", "2", cwd=tmp_path)
    try:
        term.wait_for(lambda s: "stagewise serve: starting workers" in s, "the starting-workers phase")
        assert "stagewise serve: capturing stagewise.zoo.basic:mlp" in term.screen
        code, took = term.ctrl_c()
        screen = term.screen
    finally:
        term.close()
    assert (code, term.last_line()) == (130, "stagewise serve: stopped by SIGINT; every worker reaped"), screen
    assert "Traceback" not in screen and took < 20
    _nothing_left(term.proc.pid)


def test_probe_help_and_split_table_piped(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    helped = subprocess.run([sys.executable, "-m", "stagewise.cli", "probe", "--help"], env=env, text=True,
                            capture_output=True, timeout=60, check=True).stdout
    assert "cluster.toml in the current directory" in " ".join(helped.split())
    first, last = "a" * 130, "b" * 130
    (tmp_path / "long.py").write_text(textwrap.dedent(f'''
        import torch
        from torch import nn


        def long():
            net = nn.Sequential()
            net.add_module("{first}", nn.Linear(4, 4))
            net.add_module("{last}", nn.Linear(4, 2))
            return net, torch.randn(2, 4)
    '''))
    proc = subprocess.run([sys.executable, "-m", "stagewise.cli", "split", f"{tmp_path / 'long.py'}:long",
                           "--stages", "1"], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{first} .. {last} (2)" in proc.stdout, proc.stdout  # one row, whole: not wrapped, not cut with ...
    assert "…" not in proc.stdout
