"""``stagewise split`` on the command line: the stage table, the JSON partition, and clear errors (exit code 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stagewise.cli import main
from stagewise.split import Partition, split
from stagewise.zoo.basic import large_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "large_model.py") + ":build"


def _rows(text: str) -> list[str]:
    """Table body rows (``│ 0 │ layer1 .. layer2 (2) │ ...``)."""
    return [line for line in text.splitlines() if line.startswith("│")]


def test_split_prints_every_stage_and_unit_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "partition.json"
    rc = main(["split", EXAMPLE, "--stages", "2", "--by", "params", "--repeats", "1", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = _rows(captured.out)
    assert len(rows) == 2
    assert rows[0].split("│")[1].strip() == "0" and rows[1].split("│")[1].strip() == "1"
    assert "layer1 .. layer2 (2)" in rows[0] and "layer3 (1)" in rows[1]
    assert "850" in rows[0] and "1,240" in rows[1], "parameters per stage"
    assert "480 B" in rows[0], "bytes sent by stage 0: a (4, 30) float32 activation"
    assert "2 stages (layers, cut by params)" in captured.out
    assert f"partition written to {out_json}" in captured.out

    part = Partition.from_json(out_json)
    assert Partition.from_json(part.to_json()) == part
    assert part.model == EXAMPLE and part.by == "params" and part.capture == "graph"
    assert part.unit_names() == ["layer1", "layer2", "layer3"] and part.starts == [0, 2]
    assert all(u.forward_ms > 0 for u in part.units), "the CLI always measures the units"
    expected = split(large_model(), stages=2, by="params").partition
    assert [s.units for s in part.stages] == [s.units for s in expected.stages]
    assert [s.send for s in part.stages] == [s.send for s in expected.stages]


def test_split_cuts_and_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", "stagewise.zoo.basic:large_model", "--cuts", "layer2,layer3", "--repeats", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r.split("│")[2].strip() for r in rows] == ["layer1 (1)", "layer2 (1)", "layer3 (1)"]
    assert main(["split", "stagewise.zoo.basic:multitask", "--tasks", "heads.cls,heads.reg", "--stages", "1",
                 "--by", "uniform", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert "3 stages (tasks, cut by uniform)" in out and len(rows) == 3
    assert "trunk.0 .. trunk.5 (6)" in rows[0] and "heads.cls (1)" in rows[1] and "heads.reg (1)" in rows[2]


def test_installed_console_script_runs_split(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "stagewise"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "stagewise.cli"]
    out_json = tmp_path / "p.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    proc = subprocess.run([*cmd, "split", "stagewise.zoo.basic:large_model", "--stages", "3", "--by", "uniform",
                           "--repeats", "1", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(proc.stdout)
    assert [r.split("│")[2].strip() for r in rows] == ["layer1 (1)", "layer2 (1)", "layer3 (1)"]
    part = Partition.from_json(out_json)
    assert part.num_stages == 3 and part.model == "stagewise.zoo.basic:large_model"
    assert Partition.from_json(part.to_json()) == part


@pytest.mark.parametrize(("model", "message"), [
    ("nope", "MODEL must look like 'file.py:factory' or 'package.module:factory', got 'nope'"),
    ("missing_file.py:build", "model file 'missing_file.py' does not exist"),
    ("stagewise.zoo.basic:nothing", "'stagewise.zoo.basic' has no attribute 'nothing'"),
    ("stagewise.no_such_module:build", "cannot import module 'stagewise.no_such_module'"),
])
def test_bad_model_strings_exit_2(model: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", model]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stagewise split: error: ") and message in err


def test_too_many_stages_and_bad_cuts_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split", EXAMPLE, "--stages", "7", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "LargeModel has 3 units (layer1, layer2, layer3); it cannot be cut into 7 stages. Use --stages 3 or fewer." \
        in err
    assert main(["split", EXAMPLE, "--cuts", "layer7", "--repeats", "1"]) == 2
    assert "unknown unit name 'layer7'" in capsys.readouterr().err
    assert main(["split", EXAMPLE, "--submodels", "decoder", "--repeats", "1"]) == 2
    assert "has no sub-module 'decoder'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse rejects an unknown cost itself
        main(["split", EXAMPLE, "--by", "flops"])
    assert info.value.code == 2


_MODELS = '''
import torch
from torch import nn

class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        if x.mean() > 0:  # a Python branch on a tensor value: torch.export cannot capture it
            return torch.relu(self.lin(x))
        return self.lin(x)

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x) + x

def chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Gate(), Gate(), nn.Linear(6, 2)), torch.randn(3, 4)

def residual():
    return Residual(), torch.randn(3, 6)
'''


def test_models_export_cannot_capture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "models.py"
    path.write_text(textwrap.dedent(_MODELS))
    assert main(["split", f"{path}:chain", "--stages", "2", "--by", "params", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    assert len(rows) == 2 and "0 .. 1 (2)" in rows[0] and "2 .. 3 (2)" in rows[1]
    assert main(["split", f"{path}:residual", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "torch.export could not capture Residual.forward" in err
    assert "module-boundary fallback does not apply" in err and "--submodels" in err
