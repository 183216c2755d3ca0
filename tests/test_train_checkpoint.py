"""Checkpoints in training: exact resume on the same layout, re-shard to other layouts, export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from stagewise.train import TrainConfig, Trainer


def test_resume_is_bitwise_exact(tmp_path: Path) -> None:
    base = TrainConfig(model="stagewise.zoo.gpt:tiny_gpt", stages=2, microbatches=2, steps=6, global_batch=8,
                       progress=False, log_every=0)  # dropout on: the RNG state must resume too
    full = Trainer(base).fit().losses
    first = Trainer(dataclasses.replace(base, steps=3, save_dir=str(tmp_path))).fit().losses
    rest = Trainer(dataclasses.replace(base, resume=str(tmp_path))).fit().losses
    assert first + rest == full  # bit for bit on CPU


@pytest.fixture(scope="module")
def saved_2x2(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, list[float], Path]:
    base = TrainConfig(model="stagewise.zoo.basic:mlp", stages=2, replicas=2, microbatches=2, steps=5, global_batch=8,
                       dropout=False, progress=False, log_every=0)
    full = Trainer(base).fit().losses
    root = tmp_path_factory.mktemp("ckpt")
    Trainer(dataclasses.replace(base, steps=3, save_dir=str(root))).fit()
    return base, full, root


@pytest.mark.parametrize("stages,replicas", [(4, 1), (1, 1), (3, 1)])
def test_reshard_on_load(saved_2x2: tuple[TrainConfig, list[float], Path], stages: int, replicas: int) -> None:
    base, full, root = saved_2x2
    resumed = Trainer(dataclasses.replace(base, stages=stages, replicas=replicas, resume=str(root))).fit().losses
    assert len(resumed) == 2
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[3:]), rtol=1e-5, atol=4e-5)


def test_export_loads_strictly_into_the_original_model(saved_2x2: tuple[TrainConfig, list[float], Path],
                                                        tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from stagewise.checkpoint import export_state_dict, load_checkpoint
    from stagewise.zoo.basic import mlp

    _, _, root = saved_2x2
    out = tmp_path / "model.safetensors"
    spec = mlp()
    export_state_dict(load_checkpoint(root), out, model=spec.model)
    before = spec.model(*spec.args)
    spec.model.load_state_dict(load_file(str(out)), strict=True)
    after = spec.model(*spec.args)
    assert not torch.allclose(before, after)  # trained weights differ from the fresh ones
    ckpt = load_checkpoint(root)
    assert ckpt.step == 3
    torch.testing.assert_close(load_file(str(out))["0.weight"], ckpt.tensors(["0.weight"])["0.weight"])
