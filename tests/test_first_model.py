"""A new user's own model, as issue #13 met it: the user's file written here, ``stagewise train`` run as a process.

Covers the sample forms a data set may take (and the one-line error for any other), stages without parameters, one
default balance for ``split`` and ``train``, and weights the forward never touches (still owned, saved, exported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import stagewise
from stagewise.cli import build_parser
from stagewise.split import min_max_cuts
from stagewise.split._balance import bottleneck
from stagewise.train import TrainConfig
from stagewise.train._trainer import TrainResult

SRC = Path(stagewise.__file__).resolve().parents[1]

_HEADER = """
import itertools
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import stagewise

torch.manual_seed(0)
X = torch.randn(64, 8)
Y = torch.randn(64, 4)
"""

_THREE_LAYERS = """
def factory():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return stagewise.ModelSpec(model=model, args=(X[:2],), dataset=lambda: {data}, loss={loss})
"""

_TWO_INPUTS = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x, scale):
        return self.b(torch.relu(self.a(x))) * scale

def factory():
    return stagewise.ModelSpec(model=Net(), args=(X[:2], torch.ones(2, 1)), dataset=lambda: {data}, loss={loss})
"""

_NAMED = """
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x, mask):
        return self.b(torch.relu(self.a(x))) * mask

def factory():
    data = [dict(x=X[i], mask=torch.ones(4), labels=Y[i]) for i in range(64)]
    return stagewise.ModelSpec(model=Net(), kwargs=dict(x=X[:2], mask=torch.ones(2, 4)), dataset=lambda: {data},
                               loss={loss})
"""

_UNUSED = """
class Block(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.fc = nn.Linear(i, o)
        self.spare = nn.Linear(o, o)  # this forward never calls it
        self.register_buffer("seen", torch.zeros(o))

    def forward(self, x):
        return torch.relu(self.fc(x))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Block(8, 16)
        self.b = Block(16, 16)
        self.head = nn.Linear(16, 4)
        self.other_head = nn.Linear(16, 2)  # nor this one

    def forward(self, x):
        return self.head(self.b(self.a(x)))

def factory():
    return stagewise.ModelSpec(model=Net(), args=(X[:2],), dataset=lambda: TensorDataset(X, Y), loss=F.mse_loss)
"""


def _user_file(tmp_path: Path, body: str, **fill: str) -> str:
    path = tmp_path / "my_model.py"
    path.write_text(textwrap.dedent(_HEADER) + textwrap.dedent(body).format(**fill))
    return f"{path}:factory"


def _stagewise(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stagewise.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def _train(model: str, tmp_path: Path, *extra: str, stages: int = 2) -> subprocess.CompletedProcess[str]:
    return _stagewise("train", model, "--stages", str(stages), "--steps", "3", "--global-batch", "8",
                      "--microbatches", "2", "--out", str(tmp_path / "out"), *extra, cwd=tmp_path)


@pytest.mark.parametrize(("body", "data", "loss"), [
    (_THREE_LAYERS, "TensorDataset(X, Y)", "F.mse_loss"),  # as the user wrote it: (x, y) samples
    (_TWO_INPUTS, "[((X[i], torch.ones(1)), (Y[i],)) for i in range(64)]", "F.mse_loss"),
    (_NAMED, "data", "F.mse_loss"),  # Hugging Face style: named inputs and 'labels'
    (_THREE_LAYERS, "DataLoader(TensorDataset(X, Y), batch_size=4)", "F.mse_loss"),
    (_THREE_LAYERS, "itertools.cycle(zip(X, Y))", "F.mse_loss"),  # endless, without indexing
], ids=["tensor-dataset", "tuples", "named-labels", "dataloader", "iterable"])
def test_own_model_trains_on_common_sample_forms(tmp_path: Path, body: str, data: str, loss: str) -> None:
    proc = _train(_user_file(tmp_path, body, data=data, loss=loss), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trained 3 steps" in proc.stdout


def test_wrong_sample_form_is_one_line_before_any_worker(tmp_path: Path) -> None:
    model = _user_file(tmp_path, _THREE_LAYERS, data="TensorDataset(X, X, Y)", loss="F.mse_loss")
    proc = _train(model, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "dataset sample 0 is a 3-tuple" in lines[0] and "(x, y) tensors as from TensorDataset(X, Y)" in lines[0]
    assert "[stagewise rank" not in proc.stderr  # no worker started


def test_lone_relu_stage_trains_and_split_balances_like_train(tmp_path: Path) -> None:
    model = _user_file(tmp_path, _THREE_LAYERS, data="TensorDataset(X, Y)", loss="F.mse_loss")
    proc = _train(model, tmp_path, "--save", str(tmp_path / "ckpt"), stages=3)  # stage 1 is the ReLU alone
    assert proc.returncode == 0, proc.stderr
    assert "trained 3 steps" in proc.stdout
    split_by = build_parser().parse_args(["split", model]).by
    assert split_by == TrainConfig(model=model).split.by == "params"


@pytest.mark.parametrize("costs", [[144, 0, 68, 0, 10], [0, 0, 5, 0, 5, 0, 0, 5], [3, 0, 0, 1, 0, 2, 0]])
def test_balance_prefers_cuts_without_free_stages(costs: list[int]) -> None:
    import itertools

    n = len(costs)
    every = [[0, *c] for c in itertools.combinations(range(1, n), 2)]
    best = min(bottleneck(costs, s) for s in every)
    starts = min_max_cuts(costs, 3)
    assert bottleneck(costs, starts) == best  # still the exact optimum
    bounds = [*starts, n]
    assert all(sum(costs[bounds[j]:bounds[j + 1]]) > 0 for j in range(3)), starts


def test_unused_weights_are_owned_saved_and_exported(tmp_path: Path) -> None:
    model = _user_file(tmp_path, _UNUSED)
    proc = _train(model, tmp_path, "--save", str(tmp_path / "ckpt"), stages=3)
    assert proc.returncode == 0, proc.stderr
    fresh = stagewise.load_model_spec(model).model
    result = TrainResult(losses=[], steps_per_s=0.0, out_dir=tmp_path / "out")
    assert set(result.state_dict()) == set(fresh.state_dict())
    result.load_into(fresh)  # raised "the run saved no weights for ['a.spare.weight', ...]" before
    export = tmp_path / "model.safetensors"
    proc = _stagewise("checkpoint", "export", str(tmp_path / "ckpt"), "--model", model, "--out", str(export),
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(str(export)), strict=True)


def test_xlnet_weights_its_forward_skips_are_owned() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64)
    model = transformers.XLNetLMHeadModel(config)
    ids = torch.randint(0, 64, (2, 8))
    sm = stagewise.split(model, (), {"input_ids": ids, "labels": ids}, stages=2)
    owned = [p for st in sm.stages for p in st.spec.params]
    assert len(owned) == len(set(owned))
    # Every weight once (a tied one under its first name: lm_loss.weight is the word embedding).
    assert set(owned) == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
