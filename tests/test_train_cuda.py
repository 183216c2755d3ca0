"""The GPU path: the device setting, the backend decision, staging through host memory, and CUDA training runs.

The decision and the staging helpers are tested everywhere; the runs that need CUDA skip cleanly without it. On a
machine with ONE GPU the CUDA runs put two ranks on it, which is the staged path (gloo through pinned host memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagewise.cli import build_parser
from stagewise.comm import DistTransport, find_free_port
from stagewise.comm._staging import to_device, to_host
from stagewise.launch import spawn
from stagewise.train import TrainConfig, Trainer, train_reference
from stagewise.train._data import rank_microbatches
from stagewise.train._device import choose_backend, move_stage, plan_devices, resolve_device
from stagewise.train._device import to_device as tree_to_device

RTOL, ATOL = 1e-5, 4e-5  # as in test_train.py: CUDA runs compute in true fp32 (TF32 off)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
META = torch.device("meta")


# --- everywhere: settings and decisions --------------------------------------------------------------------------

def test_device_setting_is_validated_and_named() -> None:
    assert TrainConfig(model="m:f").runtime.device == "cpu"  # the default changes nothing on CPU machines
    for ok in ("cpu", "cuda", "auto"):
        assert TrainConfig(model="m:f", device=ok).runtime.device == ok
    with pytest.raises(ValueError, match=r"device must be one of cpu, cuda, auto, got 'gpu'.*--device"):
        TrainConfig(model="m:f", device="gpu")
    assert TrainConfig.from_json(TrainConfig(model="m:f", device="auto").to_json()).runtime.device == "auto"


def test_resolve_device() -> None:
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    assert resolve_device("cuda", cuda_available=True) == "cuda"
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        resolve_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu", cuda_available=True)


@pytest.mark.parametrize("kind,gpus,ranks,expected", [
    ("cpu", 0, 4, ("gloo", False)),
    ("cpu", 8, 2, ("gloo", False)),     # GPUs present but not asked for
    ("cuda", 8, 8, ("nccl", False)),    # one GPU per rank
    ("cuda", 2, 1, ("nccl", False)),
    ("cuda", 1, 1, ("nccl", False)),
    ("cuda", 1, 2, ("gloo", True)),     # two stages on one GPU: NCCL would say "Duplicate GPU detected"
    ("cuda", 2, 4, ("gloo", True)),
])
def test_choose_backend(kind: str, gpus: int, ranks: int, expected: tuple[str, bool]) -> None:
    assert choose_backend(kind, gpus, ranks) == expected


def test_choose_backend_errors() -> None:
    with pytest.raises(ValueError, match="at least one GPU"):
        choose_backend("cuda", 0, 2)
    with pytest.raises(ValueError, match="device_kind"):
        choose_backend("xla", 1, 1)
    with pytest.raises(ValueError, match="ranks_on_host"):
        choose_backend("cpu", 0, 0)


def test_trainer_exposes_its_device_plan() -> None:
    trainer = Trainer(TrainConfig(model="stagewise.zoo.basic:mlp", stages=2, replicas=2, global_batch=16))
    plan = trainer.devices
    assert (plan.device, plan.backend, plan.staged, plan.ranks_on_host) == ("cpu", "gloo", False, 4)
    assert plan.describe() == "device cpu, backend gloo, 4 rank(s)"
    if CUDA:
        gpus = torch.cuda.device_count()
        cuda = plan_devices("cuda", 2)
        assert (cuda.backend, cuda.staged, cuda.gpus_on_host) == choose_backend("cuda", gpus, 2) + (gpus,)
        assert "backend" in cuda.describe()


def test_cli_has_device_flag() -> None:
    args = build_parser().parse_args(["train", "stagewise.zoo.basic:mlp", "--device", "auto"])
    assert args.device == "auto"
    assert build_parser().parse_args(["train", "stagewise.zoo.basic:mlp"]).device == "cpu"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "stagewise.zoo.basic:mlp", "--device", "gpu"])


# --- everywhere: staging helpers and moving stages (the meta device stands in for a GPU) ---------------------------

def test_to_host_leaves_cpu_values_alone() -> None:
    x = torch.randn(3, requires_grad=True)
    values = [x, 7, None, 2.5, True]
    out = to_host(values)
    assert out[0] is x and out[1:] == [7, None, 2.5, True]


def test_to_device_keeps_flags_and_scalars() -> None:
    x, y = torch.randn(2, 3, requires_grad=True), torch.arange(4)
    out = to_device([x, y, 3, None], META)
    assert [type(v) for v in out[2:]] == [int, type(None)] and out[2] == 3
    assert out[0].device == META and out[0].shape == (2, 3) and out[0].requires_grad and out[0].is_leaf
    assert out[1].device == META and out[1].dtype == torch.int64 and not out[1].requires_grad
    same = to_device([x], torch.device("cpu"))
    assert same[0] is x


def test_tree_to_device_moves_nested_batches() -> None:
    batch = ({"ids": torch.zeros(2, 3, dtype=torch.long)}, [torch.ones(2)], "label", 4)
    out = tree_to_device(batch, META)
    assert out[0]["ids"].device == META and out[1][0].device == META and out[2:] == ("label", 4)
    assert tree_to_device(batch, torch.device("cpu"))[0]["ids"] is batch[0]["ids"]


def test_rank_microbatches_move_each_batch_once() -> None:
    x, other, y = torch.randn(8, 3), torch.randn(8, 5), torch.arange(8)
    inputs, targets = rank_microbatches(({"x": x, "other": other}, y), needed={"x"}, microbatches=4, device=META)
    assert [list(i) for i in inputs] == [["x"]] * 4  # only the leaves this rank's stages read
    assert all(i["x"].device == META and i["x"].shape == (2, 3) for i in inputs)
    assert all(t.device == META and t.shape == (2,) for t in targets)
    # one copy per tensor per batch: every microbatch is a view of the same moved tensor
    assert len({id(i["x"]._base) for i in inputs}) == 1 and inputs[0]["x"]._base.shape == (8, 3)
    assert len({id(t._base) for t in targets}) == 1
    cpu_inputs, cpu_targets = rank_microbatches(((x,), y), needed={"arg0"}, microbatches=2,
                                                device=torch.device("cpu"))
    assert cpu_inputs[1]["arg0"]._base is x and torch.equal(cpu_inputs[1]["arg0"], x[4:])  # no copy on the CPU
    assert cpu_targets[0]._base is y
    with pytest.raises(ValueError, match="does not divide into 3 microbatches"):
        rank_microbatches(((x,), y), needed={"arg0"}, microbatches=3, device=META)


def test_move_stage_retargets_device_literals() -> None:
    from stagewise._spec import load_model_spec
    from stagewise.split import split
    from stagewise.train._rank import example_batch

    spec = load_model_spec("stagewise.zoo.gpt:tiny_gpt")
    spec.model.train(False)
    args, kwargs, _ = example_batch(spec, 2)
    _, stages = split(spec.model, args, kwargs, stages=2).stages_for(args, kwargs)

    def cpu_literals(stage: object) -> list[str]:
        return [str(n) for n in stage.module.graph.nodes  # type: ignore[attr-defined]
                if any(v == torch.device("cpu") for v in [*n.args, *n.kwargs.values()])]

    assert cpu_literals(stages[0])  # the position arange was captured with device=cpu
    move_stage(stages[0], META)
    assert not cpu_literals(stages[0])
    assert all(p.device == META for p in stages[0].parameters())
    assert all(p.device.type == "cpu" for p in stages[1].parameters())  # other stages stay where they are
    send, _ = stages[0]([], {stages[0].spec.inputs[0]: args[0].to(META)})
    assert all(t.device == META for t in send)


def test_cpu_transport_is_not_staged() -> None:
    port = find_free_port()
    with DistTransport.init(rank=0, world_size=1, master_port=port, timeout=10.0) as t:
        assert t.backend == "gloo" and t.device == torch.device("cpu") and t.staged is False
        x = torch.arange(4.0)
        t.all_reduce(x, op="mean")
        assert torch.equal(x, torch.arange(4.0))
        with pytest.raises(ValueError, match="'cpu' or a CUDA device"):
            DistTransport.from_process_group(device="meta")


# --- CUDA only -----------------------------------------------------------------------------------------------------

def _staged_worker(rank: int, world_size: int, port: int) -> None:
    with DistTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=20.0, backend="gloo",
                            device="cuda") as t:
        assert t.staged and t.device.type == "cuda"
        big = torch.arange(100_000, dtype=torch.float32, device=t.device)  # its own buffer, not the pack
        small = torch.full((3, 4), float(rank), device=t.device, requires_grad=True)
        peer = 1 - rank
        handle = t.isend([big * (rank + 1), small, 5, torch.ones(2)], dst=peer)
        got = t.recv(src=peer, timeout=20.0)
        handle.wait(20.0)
        assert all(v.device == t.device for v in got if isinstance(v, torch.Tensor))
        assert torch.equal(got[0], big * (peer + 1)) and got[2] == 5
        assert got[1].requires_grad and torch.equal(got[1].detach(), torch.full((3, 4), float(peer), device=t.device))
        x = torch.full((5,), float(rank + 1), device=t.device)
        t.all_reduce(x, op="sum")
        assert x.device == t.device and torch.equal(x, torch.full((5,), 3.0, device=t.device))
        y = torch.arange(3.0, device=t.device) * (rank + 1)
        t.broadcast(y, src=1)
        assert torch.equal(y, torch.arange(3.0, device=t.device) * 2)
        t.barrier(timeout=20.0)


@needs_cuda
def test_staged_transport_moves_cuda_tensors() -> None:
    spawn(_staged_worker, 2, timeout=120.0)


def _check(config: TrainConfig) -> tuple[dict[str, torch.Tensor], Path]:
    """Train ``config`` across processes and on CUDA in one process; compare losses and every weight."""
    trainer = Trainer(config)
    gpus = torch.cuda.device_count()
    assert (trainer.devices.backend, trainer.devices.staged) == choose_backend("cuda", gpus, config.world_size)
    result = trainer.fit()
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["staged"] == trainer.devices.staged
    ref_losses, ref_state = train_reference(config)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    from stagewise._spec import load_model_spec

    model = load_model_spec(config.model).model
    params = {name for name, _ in model.named_parameters()}
    state = result.state_dict()
    assert params <= set(state)
    for name in params:
        assert state[name].device.type == "cpu"
        torch.testing.assert_close(state[name], ref_state[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    initial = model.state_dict()
    assert any(not torch.equal(initial[n], state[n]) for n in params)  # training moved the weights
    return state, result.out_dir


@needs_cuda
def test_cuda_pipeline_matches_cuda_reference(tmp_path: Path) -> None:
    _check(TrainConfig(model="stagewise.zoo.gpt:tiny_gpt", stages=2, microbatches=2, schedule="1f1b", steps=3,
                       global_batch=8, progress=False, log_every=0, dropout=False, clip_grad_norm=0.5, device="cuda",
                       out_dir=str(tmp_path / "out")))


@needs_cuda
def test_cuda_data_parallel_matches_cuda_reference(tmp_path: Path) -> None:
    _check(TrainConfig(model="stagewise.zoo.basic:mlp", stages=1, replicas=2, microbatches=2, steps=3,
                       global_batch=16, progress=False, log_every=0, dropout=False, device="cuda",
                       out_dir=str(tmp_path / "out")))


@needs_cuda
def test_cuda_checkpoint_resumes_on_cpu(tmp_path: Path) -> None:
    common = dict(model="stagewise.zoo.basic:mlp", stages=2, microbatches=2, steps=2, global_batch=8,
                  progress=False, log_every=0, dropout=False)
    saved, _ = _check(TrainConfig(**common, device="cuda", save_dir=str(tmp_path / "ckpt"),  # type: ignore[arg-type]
                                  out_dir=str(tmp_path / "cuda")))
    resumed = Trainer(TrainConfig(**common, device="cpu", resume=str(tmp_path / "ckpt"),  # type: ignore[arg-type]
                                  out_dir=str(tmp_path / "cpu"))).fit().state_dict()
    assert set(resumed) == set(saved)
    for name, value in saved.items():
        assert torch.equal(resumed[name], value), name
