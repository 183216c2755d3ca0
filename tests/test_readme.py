"""Every ```python and ```bash block of README.md runs as written (issue 13).

The README is read when the test runs, so an edited block is tested as edited. Blocks run in README order in one
temporary directory (later blocks use what earlier ones wrote: ``runs/ckpt``, ``cluster.toml``), through a ``stagewise``
on PATH that runs this checkout (``python -m stagewise.cli`` with ``PYTHONPATH=src``). How each kind of command runs is
the explicit table :data:`HOW`; a command no row matches fails the test (add a row), so nothing is skipped silently.

The only rewrites, all in :func:`shrink`: step counts are divided by 50 (``--steps 100`` -> ``--steps 2``,
``steps=100`` -> ``steps=2``, ``--save-every 20`` -> ``--save-every 1``) and the port 8000 becomes a free one.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_run import ROOT, cli_env, free_port, run_ok, serving

README = ROOT / "README.md"

RUN, SERVER, CLIENT, NOT_RUN, FILE = "run", "server", "client", "not run", "file"
HOW: list[tuple[str, str, str]] = [
    # (regex on the command or python block, how it runs, why)
    (r"\A# [\w/]+\.py\n", FILE, "a Python block headed `# NAME.py` is a user's file: written there for later blocks"),
    (r"^make quickstart\b", NOT_RUN, "creates .venv and installs torch from the network; CI runs it (.ci/run)"),
    (r"^make test\b", NOT_RUN, "runs the whole test suite, this test included; CI runs it (.ci/run)"),
    (r"--worker-listen 10\.0\.0\.|^STAGEWISE_TOKEN=\S+ stagewise worker --join", NOT_RUN,
     "needs a second machine; tests/test_serve_remote.py runs it across two network namespaces"),
    (r"^stagewise serve\b", SERVER, "started in the background; must answer /v2/health/ready, then is stopped"),
    (r"^stagewise infer\b", CLIENT, "runs against the server the block's last serve command started"),
    (r"tritonclient", CLIENT, "runs against the README's token-guarded checkpoint server (`--token secret`)"),
    (r"^torchrun .*--nnodes [2-9]", NOT_RUN, "needs several machines; tests/test_multi_host.py runs it on two network "
                                             "namespaces"),
    (r"^curl\b", CLIENT, "runs against the server the block's last serve command started (-f: an HTTP error fails)"),
    (r"^stagewise train .*--serve-url", CLIENT, "pushes its weights to the server the block's last serve started"),
    (r"^stagewise generate\b", CLIENT, "runs against the server the block's last serve-generate command started"),
    (r"from openai import", CLIENT, "runs against the README's generation server (`stagewise serve-generate`)"),
    (r"^(stagewise|torchrun) ", RUN, "runs to completion; must exit 0"),
    (r"", RUN, "a Python block: runs as a script; must exit 0"),
]
SETUP = ["stagewise train stagewise.zoo.basic:mlp --stages 2 --steps 3 --save runs/quickstart"]
"""What `make quickstart` leaves behind, which the Serve section uses (``runs/quickstart``)."""

@dataclasses.dataclass
class Block:
    lang: str
    text: str
    line: int


def readme_blocks(text: str) -> list[Block]:
    blocks, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(python|bash)\s*$", lines[i])
        if m:
            end = lines.index("```", i + 1)
            blocks.append(Block(m.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1))
            i = end
        i += 1
    return blocks


def bash_commands(text: str) -> list[str]:
    """One string per command: continuation lines joined, comments dropped (so a flag appended to a line counts)."""
    joined = re.sub(r"\\\n\s*", "", text)
    lines = (re.sub(r"(^|\s)#(\s.*)?$", "", c).strip() for c in joined.splitlines())
    return [c for c in lines if c]


def how(command: str) -> tuple[str, str]:
    for pattern, mode, why in HOW:
        if re.search(pattern, command):
            return mode, why
    raise AssertionError(f"no row of HOW says how to run {command!r}")  # pragma: no cover - HOW ends with a catch-all


def shrink(text: str, port: int) -> str:
    text = re.sub(r"(--steps |steps=)(\d+)", lambda m: f"{m.group(1)}{max(1, int(m.group(2)) // 50)}", text)
    text = re.sub(r"--save-every \d+", "--save-every 1", text)
    return text.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")


@dataclasses.dataclass
class Step:
    mode: str
    text: str
    lang: str
    line: int


def steps(blocks: list[Block]) -> Iterator[Step]:
    for b in blocks:
        if b.lang == "python":
            yield Step(how(b.text)[0], b.text, "python", b.line)
        else:
            for c in bash_commands(b.text):
                yield Step(how(c)[0], c, "bash", b.line)


def test_readme_lists_how_every_block_runs() -> None:
    """Every block is in the plan below; the blocks it does not run still exist, each with its reason."""
    all_steps = list(steps(readme_blocks(README.read_text())))
    assert len(all_steps) > 10
    not_run = {s.text.split()[0] + " " + s.text.split()[1] for s in all_steps if s.mode == NOT_RUN}
    assert not_run == {"make quickstart", "make test", "torchrun --nnodes", "stagewise serve",
                       "STAGEWISE_TOKEN=secret stagewise"}, not_run  # the last three need a second machine
    assert [s for s in all_steps if "tritonclient" in s.text], "the tritonclient block is gone"
    assert [s for s in all_steps if s.mode == FILE], "the README has no user's model file (Your own model)"


@pytest.fixture
def push_folders_removed() -> Iterator[None]:
    """``stagewise train --serve-url`` leaves its push folder in /dev/shm after the run (a serving replica that
    restarts reads its version there); the ones the README's commands made are removed afterwards."""
    shm = Path("/dev/shm")
    before = set(shm.glob("stagewise-push-*"))
    yield
    for path in set(shm.glob("stagewise-push-*")) - before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(1500)
@pytest.mark.usefixtures("push_folders_removed")
def test_readme_blocks_run(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    for cmd in SETUP:
        run_ok(cmd, work, env, f"setup {cmd!r} (what make quickstart leaves)")
    blocks = readme_blocks(README.read_text())
    client_python = [b for b in blocks if b.lang == "python" and how(b.text)[0] == CLIENT]
    ran_python_client: set[int] = set()
    plan = list(steps(blocks))
    i = 0
    while i < len(plan):
        step = plan[i]
        i += 1
        what = f"README line {step.line}: {step.text.strip().splitlines()[0]!r}"
        if step.mode == NOT_RUN or (step.mode == CLIENT and step.lang == "python"):
            continue  # listed in HOW with its reason / run below, while its server is up
        if step.mode == FILE:
            (work / step.text.split()[1]).write_text(shrink(step.text, 8000))
            continue
        assert step.mode != CLIENT, f"{what}: no serve command before it in its block"
        if step.mode == RUN:
            if step.lang == "python":
                script = work / f"readme_{step.line}.py"
                script.write_text(shrink(step.text, 8000))
                run_ok(f"{sys.executable} {script}", work, env, what)
            else:
                run_ok(shrink(step.text, 8000), work, env, what)
            continue
        clients = []
        while i < len(plan) and plan[i].mode == CLIENT and plan[i].lang == "bash":
            clients.append(plan[i])
            i += 1
        port = free_port()
        text = shrink(step.text, port)
        text += "" if "--port" in text else f" --port {port}"
        with serving(text, port, work, env, what):
            for c in clients:
                run_ok(shrink(c.text, port), work, env, f"README line {c.line}: {c.text!r}")
            for b in client_python:  # each Python client runs with the server it talks to
                if ("--token secret" in text) if "tritonclient" in b.text else ("serve-generate" in text):
                    script = work / f"readme_{b.line}.py"
                    script.write_text(shrink(b.text, port))
                    run_ok(f"{sys.executable} {script}", work, env, f"README line {b.line} (python, with {text!r})")
                    ran_python_client.add(b.line)
    assert ran_python_client == {b.line for b in client_python}, "a Python client block found no server to run with"
