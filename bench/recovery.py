"""Recovery of training: what a killed rank costs a run that restarts by itself (``--max-restarts``).

Run: ``PYTHONPATH=src python bench/recovery.py`` (about a minute; loopback only; stops by itself).

Real ``stagewise train`` processes (through the CLI, 2 stages x 2 replicas of ``stagewise.zoo.gpt:tiny_gpt``, rank 0
printing every step). Three kinds of run of the same ``--steps``:

- without snapshots, and with ``--max-restarts 1 --snapshot-every K``, alternated ``--repeat`` times each; O compares
  their best steps/s (the ranks' own clock: start-up excluded);
- with snapshots, and one rank SIGKILLed half-way between two snapshots. T = seconds from the SIGKILL to the first
  step the restarted run prints; L = steps finished before the kill that the restart computes again (the newest step
  printed before the restart's WARNING line minus the step it restarts from).

The last line is machine-readable: ``recovery restart_s=T lost_steps=L overhead_pct=O``. Goals (issue #17): T <= 10,
L <= K, O <= 5.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from stagewise._procs import grandchildren

MODEL = "stagewise.zoo.gpt:tiny_gpt"
STEP_LINE = re.compile(r"^step (\d+)/")
RESTART_LINE = re.compile(r"restart 1 of \d+: .*restarting from step (\d+)")


def _command(steps: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "stagewise.cli", "train", MODEL, "--stages", "2", "--replicas", "2",
            "--microbatches", "2", "--global-batch", "8", "--steps", str(steps), "--log-every", "1", "--no-progress",
            *extra]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parent.parent / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


class Run:
    """One ``stagewise train`` process; every output line kept with the time it was read."""

    def __init__(self, steps: int, extra: list[str]) -> None:
        self.proc = subprocess.Popen(_command(steps, extra), env=_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float = 600.0) -> str:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        text = "\n".join(line for _, line in self.lines)
        if code != 0:
            raise SystemExit(f"stagewise train exited with {code}:\n{text[-3000:]}")
        return text

    def steps_seen(self) -> int:
        seen = [int(m.group(1)) for _, line in list(self.lines) if (m := STEP_LINE.match(line))]
        return max(seen, default=0)


def _steps_per_s(text: str) -> float:
    m = re.search(r"\(([\d.]+) steps/s\)", text)
    if m is None:
        raise SystemExit(f"no steps/s in the output:\n{text[-2000:]}")
    return float(m.group(1))


def _recovery(steps: int, every: int) -> tuple[float, int]:
    run = Run(steps, ["--max-restarts", "1", "--snapshot-every", str(every)])
    target = every + every // 2  # half-way between two snapshots
    deadline = time.monotonic() + 300
    while run.steps_seen() < target:
        if run.proc.poll() is not None or time.monotonic() > deadline:
            run.wait(timeout=1)
            raise SystemExit(f"the run ended or stalled before step {target}")
        time.sleep(0.005)
    ranks = grandchildren(run.proc.pid)
    if len(ranks) != 4:
        raise SystemExit(f"expected 4 ranks, found {ranks}")
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    text = run.wait()
    restart = next((i for i, (_, line) in enumerate(run.lines) if RESTART_LINE.search(line)), None)
    if restart is None:
        raise SystemExit(f"no restart in the output:\n{text[-3000:]}")
    since = int(RESTART_LINE.search(run.lines[restart][1]).group(1))  # type: ignore[union-attr]
    before = max(int(m.group(1)) for _, line in run.lines[:restart] if (m := STEP_LINE.match(line)))
    first_after = next(t for t, line in run.lines[restart:] if STEP_LINE.match(line))
    return first_after - killed_at, before - since


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    plain, snap = [], []
    for _ in range(args.repeat):  # alternated: a machine that gets busier slows both alike
        plain.append(_steps_per_s(Run(args.steps, []).wait()))
        snap.append(_steps_per_s(Run(args.steps, ["--max-restarts", "1", "--snapshot-every",
                                                  str(args.snapshot_every)]).wait()))
    overhead = (max(plain) / max(snap) - 1) * 100
    print(f"steps/s without snapshots {plain}, with snapshots every {args.snapshot_every} steps {snap}")
    restart_s, lost = _recovery(args.steps, args.snapshot_every)
    print(f"recovery restart_s={restart_s:.2f} lost_steps={lost} overhead_pct={overhead:.1f}")


if __name__ == "__main__":
    main()
