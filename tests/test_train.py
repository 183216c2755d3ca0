"""Training across real processes (gloo) matches single-process training on the same data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stagewise.comm import find_free_port
from stagewise.train import DataConfig, TrainConfig, Trainer, train_reference
from stagewise.train._data import ReplicaBatches, global_batches, split_microbatches

RTOL, ATOL = 1e-5, 4e-5


def _compare(config: TrainConfig) -> None:
    result = Trainer(config).fit()
    ref_losses, ref_state = train_reference(config)
    assert len(result.losses) == config.steps
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    state = result.state_dict()
    params = {name for name, _ in train_reference_model(config).named_parameters()}
    assert params <= set(state), f"missing weights: {sorted(params - set(state))[:5]}"
    for name in params:
        torch.testing.assert_close(state[name], ref_state[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    # Training moved the weights (the comparison is not vacuous).
    initial = train_reference_model(config).state_dict()
    assert any(not torch.equal(initial[n], state[n]) for n in params)


def train_reference_model(config: TrainConfig) -> torch.nn.Module:
    """The model as every run of ``config`` starts: the factory's weights, or the seeded layout-free ones."""
    from stagewise.split import materialise
    from stagewise.train._rank import load_train_spec

    torch.manual_seed(config.data.seed)
    model = load_train_spec(config).model
    materialise(model, [n for n, p in model.named_parameters() if p.is_meta], seed=config.data.seed)
    return model


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,replicas", [(2, 1), (1, 2), (2, 2), (4, 1)])
def test_matches_single_process(schedule: str, stages: int, replicas: int) -> None:
    model = "stagewise.zoo.basic:large_model" if stages < 4 else "stagewise.zoo.basic:mlp"
    _compare(TrainConfig(model=model, stages=stages, replicas=replicas, microbatches=4, schedule=schedule, steps=3,
                         global_batch=16, progress=False, log_every=0, dropout=False))


def test_stage_major_rank_order_matches_single_process() -> None:
    """rank = stage x replicas + replica (a stage's replicas on consecutive ranks): the same training."""
    _compare(TrainConfig(model="stagewise.zoo.basic:large_model", stages=2, replicas=2, microbatches=2, steps=3,
                         global_batch=16, progress=False, log_every=0, dropout=False, rank_order="stages"))


@pytest.mark.parametrize("transport", ["auto", "shm"])
@pytest.mark.parametrize("schedule,stages_per_rank", [("interleaved", 2), ("zb", 1)])
def test_interleaved_and_zero_bubble_match_single_process(schedule: str, stages_per_rank: int, transport: str) -> None:
    """shm: interleaved sends forward and backward values between the same two ranks on many tags (one ring)."""
    _compare(TrainConfig(model="stagewise.zoo.basic:mlp", stages=2, stages_per_rank=stages_per_rank, microbatches=4,
                         schedule=schedule, steps=3, global_batch=16, progress=False, log_every=0, dropout=False,
                         transport=transport))


@pytest.mark.parametrize("model,schedule,stages,replicas,transport", [
    ("stagewise.zoo.hf:gpt2", "1f1b", 2, 1, "auto"),          # Hugging Face, tied embedding / LM head across stages
    ("stagewise.zoo.gpt:tiny_gpt", "gpipe", 2, 2, "auto"),    # our GPT, tied weights, hybrid
    ("stagewise.zoo.gpt:tiny_gpt", "1f1b", 2, 2, "shm"),      # the same over shared memory (all-reduce on gloo)
])
def test_tied_and_hf_models_match(model: str, schedule: str, stages: int, replicas: int, transport: str) -> None:
    _compare(TrainConfig(model=model, stages=stages, replicas=replicas, microbatches=2, schedule=schedule, steps=3,
                         global_batch=8, progress=False, log_every=0, dropout=False, clip_grad_norm=0.5,
                         transport=transport))


@pytest.mark.parametrize("model,schedule,stages,replicas", [
    ("stagewise.zoo.hf:gpt2", "1f1b", 2, 1),
    ("stagewise.zoo.basic:large_model", "gpipe", 2, 2),
    ("stagewise.zoo.gpt:tiny_gpt", "1f1b", 4, 1),
])
def test_meta_built_seeded_runs_match_single_process(model: str, schedule: str, stages: int, replicas: int) -> None:
    """Every rank builds the model on the meta device and initialises only its own stages, seeded by module name;
    the single-process reference initialises the whole model the same way: the runs match exactly."""
    _compare(TrainConfig(model=model, stages=stages, replicas=replicas, microbatches=2, schedule=schedule, steps=3,
                         global_batch=8, progress=False, log_every=0, dropout=False, init="seeded"))


def test_a_sub_model_partition_trains_as_saved(tmp_path: Path) -> None:
    """A partition saved from a sub-model split keeps its mode on the way to the ranks (not re-cut as layers)."""
    from stagewise._spec import load_model_spec
    from stagewise.split import Partition, split

    spec = load_model_spec("stagewise.zoo.hf:t5")
    saved = split(spec, submodels=["encoder", "decoder"]).partition
    saved.to_json(tmp_path / "p.json")
    config = TrainConfig(model="stagewise.zoo.hf:t5", stages=2, microbatches=2, steps=2, global_batch=8,
                         progress=False, log_every=0, dropout=False, partition=str(tmp_path / "p.json"))
    from stagewise.train._rank import rank_packs

    packs = rank_packs(config)
    assert [p.partition.mode for p in packs.values()] == ["submodels", "submodels"]
    assert Partition.from_json(tmp_path / "p.json").starts == packs[0].partition.starts
    _compare(config)


def test_global_batches_cover_each_epoch_once() -> None:
    batches = list(global_batches(10, global_batch=5, steps=4, seed=3, shuffle=True))
    assert sorted(batches[0] + batches[1]) == list(range(10))
    assert sorted(batches[2] + batches[3]) == list(range(10))
    assert batches[:2] != batches[2:]  # a new permutation each epoch
    assert batches == list(global_batches(10, global_batch=5, steps=4, seed=3, shuffle=True))


def test_replica_shards_are_disjoint_and_deterministic() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(24.0).unsqueeze(1))
    seen = []
    for replica in range(3):
        it = ReplicaBatches(data, data=DataConfig(global_batch=12, seed=0, sharding="shard"), replica=replica,
                            replicas=3, steps=2)
        rows = [int(v) for (batch,) in it for v in batch.flatten()]
        assert len(rows) == 8
        seen.extend(rows)
        replicated = DataConfig(global_batch=12, seed=0, sharding="replicate")
        again = [int(v) for (batch,) in ReplicaBatches(data, data=replicated, replica=replica, replicas=3, steps=2)
                 for v in batch.flatten()]
        assert again == rows  # replicate reads the same samples as shard, from a full copy
    assert sorted(seen) == list(range(24))


def test_split_microbatches_keeps_structure() -> None:
    batch = ({"x": torch.arange(8).view(4, 2)}, (torch.arange(4),))
    parts = split_microbatches(batch, 2)
    assert len(parts) == 2 and torch.equal(parts[1][0]["x"], torch.tensor([[4, 5], [6, 7]]))
    with pytest.raises(ValueError, match="microbatches"):
        split_microbatches(batch, 3)


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="global_batch 10 must divide"):
        TrainConfig(model="m:f", replicas=2, microbatches=4, global_batch=10)
    with pytest.raises(ValueError, match="schedule must be one of .*got .nope.; set --schedule"):
        TrainConfig(model="m:f", schedule="nope")


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def test_killing_a_rank_stops_the_others_with_a_clear_error(tmp_path: Path) -> None:
    port = find_free_port()
    cmd = [sys.executable, "-m", "stagewise.cli", "train", "stagewise.zoo.basic:large_model", "--stages", "2",
           "--steps", "100000", "--global-batch", "8", "--microbatches", "2", "--timeout", "10"]
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen(cmd, env=_env(r, 2, port), stdout=logs[r], stderr=subprocess.STDOUT) for r in range(2)]
    try:
        deadline = time.monotonic() + 90
        while "step 10/" not in (tmp_path / "rank0.log").read_text():
            assert time.monotonic() < deadline, "training did not start"
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=30)
        assert time.monotonic() - killed_at < 30
        assert code != 0
        text = (tmp_path / "rank0.log").read_text()
        assert "rank 0" in text and "stage 0" in text, text[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for f in logs:
            f.close()


def test_runs_under_torchrun(tmp_path: Path) -> None:
    """Rank 0 captures and splits the model once; rank 1 reads its stages from the rendezvous store (the log says
    which process captured: one line per capture)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(find_free_port()), "-m", "stagewise.cli", "train", "stagewise.zoo.basic:large_model",
           "--stages", "2", "--steps", "3", "--global-batch", "16", "--microbatches", "4", "--no-dropout",
           "--out", str(out), "--verbose"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 3 steps" in done.stdout
    assert done.stderr.count("capturing LargeModel.forward") == 1, done.stderr[-3000:]
    assert "rank 0: split stagewise.zoo.basic:large_model into 2 stages and published them" in done.stderr
    assert "rank 1: took the stages of position 1 from rank 0" in done.stderr
    config = TrainConfig(model="stagewise.zoo.basic:large_model", stages=2, steps=3, global_batch=16, microbatches=4,
                         dropout=False)
    ref_losses, ref_state = train_reference(config)
    import json

    losses = json.loads((out / "summary.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    from safetensors.torch import load_file

    state = {**load_file(str(out / "stage0.safetensors")), **load_file(str(out / "stage1.safetensors"))}
    for name, value in state.items():
        torch.testing.assert_close(value, ref_state[name], rtol=RTOL, atol=ATOL)


def test_trace_has_every_action_of_every_rank(tmp_path: Path) -> None:
    import json

    from stagewise.schedule import add_communication, build

    trace = tmp_path / "trace"
    Trainer(TrainConfig(model="stagewise.zoo.basic:large_model", stages=2, microbatches=4, schedule="1f1b", steps=2,
                        global_batch=16, progress=False, log_every=0, trace=str(trace))).fit()
    data = json.loads((trace / "trace.json").read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in events} == {0, 1}
    schedule = add_communication(build("1f1b", ranks=2, microbatches=4))
    for rank, actions in schedule.actions.items():
        for step in (0, 1):
            names = [e["name"] for e in events if e["tid"] == rank and e["args"]["step"] == step]
            assert [n for n in names if n[0].isdigit()] == [str(a) for a in actions]
            assert "all-reduce" in names and "optimizer" in names
    assert all(e["dur"] >= 0 for e in events)
    png = (trace / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_transport_setting_picks_what_carries_messages() -> None:
    from stagewise.train._device import plan_devices

    assert plan_devices("cpu", 2, "shm").transport == "shm"
    assert plan_devices("cpu", 2, "auto").transport == plan_devices("cpu", 2, "gloo").transport == "gloo"
    assert "shared-memory rings" in Trainer(TrainConfig(model="m:f", stages=2, transport="shm")).devices.describe()
    with pytest.raises(ValueError, match="transport 'shm' moves CPU tensors and device is cuda; use --transport auto"):
        TrainConfig(model="m:f", transport="shm", device="cuda")
    with pytest.raises(ValueError, match="transport must be one of auto, shm, gloo, got 'tcp'; set --transport"):
        TrainConfig(model="m:f", transport="tcp")
