"""A new user's first hour on the command line (issue 13, items 7, 9, 10): each mistake is one line on stderr before
any worker starts, the CLI says where things went, and ``--help`` is fast."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def stagewise(*argv: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """``python -m stagewise.cli ARGV`` as the user runs it, from ``cwd``."""
    full_env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "stagewise.cli", *argv], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # no traceback, no worker output
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- item 10: --help fast, --version, -v after the command, every default shown --------------------------------


def test_help_imports_no_heavy_module(tmp_path: Path) -> None:
    code = ("import sys\nfrom stagewise.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'numpy', 'fastapi', 'safetensors', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, text=True,
                         capture_output=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"
    proc = stagewise("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "train" in proc.stdout and "serve" in proc.stdout


def test_version_and_verbose_after_the_command(tmp_path: Path) -> None:
    import stagewise as sw

    proc = stagewise("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"stagewise {sw.__version__}"
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\n\ndef model():\n    torch.nn.Linear(2, 2)\n    return 1 / 0\n")
    quiet = stagewise("train", f"{bad}:model", cwd=tmp_path)
    line = one_line_error(quiet, "ZeroDivisionError", f"{bad}:6", "-v")
    assert line.startswith("stagewise train: error:")
    loud = stagewise("train", f"{bad}:model", "-v", cwd=tmp_path)  # -v after the command: the full traceback
    assert loud.returncode == 2 and "Traceback" in loud.stderr and "return 1 / 0" in loud.stderr


def test_every_option_shows_its_default() -> None:
    import argparse

    from stagewise.cli import build_parser

    def parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [p]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    found += parsers(sub)
        return found

    missing = [f"{p.prog} {a.option_strings[0]}" for p in parsers(build_parser()) for a in p._actions
               if a.option_strings and a.default is not argparse.SUPPRESS and "default" not in (a.help or "")
               and p.prog != "stagewise"]
    assert missing == []
    assert len(parsers(build_parser())) >= 9  # the walk reached every command (and checkpoint info/export)


def test_plan_table_fits_80_columns() -> None:
    from rich.console import Console

    from stagewise._plan_cli import print_plans
    from stagewise.plan import Plan

    cut = ["", *(f"transformer.h.{i}" for i in range(3, 24, 4)), "lm_head"]
    plan = Plan(mode="train", devices=4, stages=4, replicas=1, stages_per_rank=2, microbatches=16,
                schedule="interleaved", global_batch=64, microbatch_rows=4, cut=cut, step_time_s=1.2345,
                bubble_fraction=0.123, memory_bytes=[2**27, 2**31, 1, 1], device_memory_bytes=16 * 2**30,
                throughput=12345.6)
    console = Console(width=80, record=True)
    print_plans([plan], title="gpt2.py:model: best train plans for 4 device(s)", console=console)
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    for shown in ("1x4 v2", "16x4", "interleaved", "1234.5", "12%", "2.0 GiB", "12,346", "transformer.h.3"):
        assert shown in text, (shown, text)


# --- item 7: checked before forking --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "needles"), [
    (["--lr", "-1"], ["lr must be > 0", "--lr"]),
    (["--lr", "0"], ["lr must be > 0"]),
    (["--steps", "0"], ["steps must be >= 1", "--steps"]),
    (["--stages", "50"], ["cannot be cut into 50 stages", "--stages 11 or fewer"]),
])
def test_train_mistakes_are_one_line_before_any_worker(tmp_path: Path, argv: list[str], needles: list[str]) -> None:
    proc = stagewise("train", "stagewise.zoo.basic:mlp", *argv, cwd=tmp_path, timeout=60)
    one_line_error(proc, *needles)
    assert "rank" not in proc.stderr.lower()  # no worker ever started (they would name their rank)


def test_not_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    one_line_error(stagewise("train", "stagewise.zoo.basic:mlp", "--resume", str(tmp_path), cwd=tmp_path),
                   "no complete checkpoint", str(tmp_path))
    one_line_error(stagewise("serve", str(tmp_path), cwd=tmp_path), "no complete checkpoint", str(tmp_path))


def test_infer_without_a_server_and_serve_on_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        one_line_error(stagewise("serve", "stagewise.zoo.basic:mlp", "--port", str(port), cwd=tmp_path, timeout=60),
                       f"127.0.0.1:{port}", "--port")
    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}"
    one_line_error(stagewise("infer", url, "mlp", "--random", cwd=tmp_path, timeout=60),
                   f"cannot reach {url}", "stagewise serve")


# --- item 9: say where things went ---------------------------------------------------------------------------------


def test_train_says_where_things_went_and_leaves_no_temp_folder(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    ckpt, trace = tmp_path / "ckpt", tmp_path / "trace"
    proc = stagewise("train", "stagewise.zoo.basic:mlp", "--steps", "2", "--stages", "2", "--replicas", "2",
                     "--global-batch", "8", "--microbatches", "2", "--save", str(ckpt), "--trace", str(trace),
                     "--no-progress", cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"saved checkpoint step 2 to {ckpt}" in proc.stdout, proc.stdout
    assert f"trace written to {trace}" in proc.stdout
    assert "weights not kept: pass --out DIR" in proc.stdout
    assert list(scratch.glob("stagewise-train-*")) == []  # the ranks' hand-over folder is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tmp", "trace"]  # nothing else in the cwd

    from stagewise.plan import Plan

    plan = tmp_path / "plan.json"
    Plan(mode="train", devices=4, stages=4, replicas=1, stages_per_rank=1, microbatches=2, schedule="1f1b",
         global_batch=8, microbatch_rows=4, cut=["0", "2", "4", "6"], step_time_s=0.01, bubble_fraction=0.4,
         memory_bytes=[1] * 4, device_memory_bytes=2**30).to_json(plan)
    resumed = stagewise("train", "stagewise.zoo.basic:mlp", "--steps", "3", "--plan", str(plan),
                        "--resume", str(ckpt), "--no-progress", cwd=tmp_path, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"layout from {plan}: stages 4, replicas 1" in resumed.stderr, resumed.stderr
    assert f"resuming from {ckpt}" in resumed.stderr and "step 2 (layout changed from (2,2) to (4,1))" in \
        resumed.stderr, resumed.stderr
    assert list(scratch.glob("stagewise-train-*")) == []
