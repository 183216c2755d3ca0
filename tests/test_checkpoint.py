"""Checkpoints: atomic save/commit/load by FQN, pruning, corruption detection, crash safety, exact optimizer and RNG
resume, re-sharding to another layout, and export to the original model (tiny GPT, Hugging Face GPT-2)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import stagewise.checkpoint as ckpt_api
from stagewise.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    add_checkpoint_parser,
    export_pretrained,
    export_state_dict,
    format_info,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state_by_fqn,
    restore_rng_state,
    rng_state_json,
    tied_groups,
)

SRC = Path(__file__).resolve().parents[1] / "src"


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_stages() -> dict[str, Any]:
    """tiny_gpt's weights (perturbed, so a fresh model differs) as two pipeline stages would save them: by FQN, the
    tied embedding/LM-head weight owned by the first stage only (``split`` gives the same keys; it is not run here
    to keep the test fast)."""
    from stagewise.zoo.gpt import tiny_gpt

    spec = tiny_gpt()
    with torch.no_grad():
        for p in spec.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = spec.model.state_dict()
    first = {k: v for k, v in sd.items() if k.startswith(("wte.", "wpe.", "blocks.0.", "blocks.1."))}
    second = {k: v for k, v in sd.items() if k not in first and k != "lm_head.weight"}
    partition = {"mode": "layers", "stages": [{"index": 0, "units": ["blocks.0", "blocks.1"]},
                                              {"index": 1, "units": ["blocks.2", "blocks.3"]}]}
    return {"spec": spec, "stages": [first, second], "partition": partition}


def _save_gpt(root: Path, gpt: dict[str, Any], step: int = 1, **writer_kw: Any) -> Path:
    writer = CheckpointWriter(root, **writer_kw)
    for s, tensors in enumerate(gpt["stages"]):
        writer.save_part(step, part=f"stage{s}", tensors=tensors, extra_json={"stage": s})
    return writer.commit(step, parts=["stage0", "stage1"], partition=json.dumps(gpt["partition"]),
                         tied=tied_groups(gpt["spec"].model), manifest_extra={"data": {"epoch": 0, "sample": 64}})


def _small(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(8, 4, generator=g), "a.bias": torch.randn(8, generator=g)}


# --- round trip, layout ------------------------------------------------------------------------------------------


def test_round_trip_two_parts_and_manifest(tmp_path: Path, gpt_stages: dict[str, Any]) -> None:
    final = _save_gpt(tmp_path, gpt_stages, step=7)
    assert final == tmp_path / "step-00000007"
    assert sorted(p.name for p in final.iterdir()) == ["manifest.json", "stage0.model.safetensors",
                                                       "stage1.model.safetensors"]
    ck = load_checkpoint(tmp_path)
    assert ck.step == 7 and ck.parts == ["stage0", "stage1"]
    original = gpt_stages["spec"].model.state_dict()
    got = ck.tensors()
    assert "lm_head.weight" not in got and set(got) == set(original) - {"lm_head.weight"}
    for k, v in got.items():
        assert torch.equal(v, original[k]), k
    m = ck.manifest
    assert m["partition"] == gpt_stages["partition"]
    assert m["parts"]["stage1"]["tensors"]["ln_f.weight"] == {"dtype": "float32", "shape": [32]}
    assert set(m["files"]) == {"stage0.model.safetensors", "stage1.model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m["files"].values())
    assert ck.extra == {"data": {"epoch": 0, "sample": 64}} and ck.part_extra("stage1") == {"stage": 1}
    assert ck.tied == [["wte.weight", "lm_head.weight"]]
    with safe_open(str(final / "stage1.model.safetensors"), "pt") as f:  # standard safetensors, by FQN
        assert torch.equal(f.get_tensor("ln_f.weight"), original["ln_f.weight"])


def test_reshard_any_layout_reads_its_own_fqns(tmp_path: Path, gpt_stages: dict[str, Any]) -> None:
    _save_gpt(tmp_path, gpt_stages)
    ck = load_checkpoint(tmp_path, verify="read")
    original = gpt_stages["spec"].model.state_dict()
    # A 3-stage layout where the last stage owns the tied weight under the LM head's name.
    layout = [["wte.weight", "wpe.weight", "blocks.0.ln_1.weight"], ["blocks.1.mlp.c_fc.weight", "blocks.3.ln_2.bias"],
              ["ln_f.weight", "lm_head.weight"]]
    for fqns in layout:
        got = ck.tensors(fqns)
        assert list(got) == fqns
        for k in fqns:
            assert torch.equal(got[k], original[k]), k
    with pytest.raises(CheckpointError, match="'head.weight' is not in checkpoint"):
        ck.tensors(["head.weight"])


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointWriter(tmp_path, keep=0)
    w = CheckpointWriter(tmp_path)
    with pytest.raises(ValueError, match="part name"):
        w.save_part(1, part="stage/0", tensors=_small(0))
    with pytest.raises(ValueError, match="not a tensor"):
        w.save_part(1, part="s", tensors={"a": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        w.save_part(1, part="s", tensors=_small(0), extra_json={"f": object()})
    with pytest.raises(ValueError, match="step must be an int"):
        w.save_part(-1, part="s", tensors=_small(0))
    w.save_part(1, part="stage0", tensors=_small(0))
    with pytest.raises(CheckpointError, match=r"part\(s\) \['stage1'\] were not saved"):
        w.commit(1, parts=["stage0", "stage1"])
    assert list_checkpoints(tmp_path) == []  # nothing half-committed


@pytest.mark.parametrize("direct", [True, False], ids=["direct-io", "page-cache"])
def test_dtypes_round_trip_and_match_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 direct: bool) -> None:
    import stagewise.checkpoint._write as wr

    monkeypatch.setattr(wr, "DIRECT_IO", direct and wr.DIRECT_IO)
    monkeypatch.setattr(wr, "CHUNK", 8192)  # several buffers per file, then an unaligned tail
    tensors = {
        "big": torch.randn(10_001),
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(), "f64": torch.randn(2, 2).double(),
        "i64": torch.arange(6).reshape(2, 3), "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([255, 1], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2],
    }
    CheckpointWriter(tmp_path).save(0, tensors=tensors)
    ck = load_checkpoint(tmp_path)
    theirs = load_file(str(tmp_path / "step-00000000" / "model.model.safetensors"))
    assert set(ck.tensors()) == set(tensors)
    for name, ours in ck.tensors().items():
        assert ours.dtype == tensors[name].dtype and torch.equal(ours, tensors[name]), name
        assert torch.equal(theirs[name], tensors[name]), name
    with pytest.raises(ValueError, match="which safetensors cannot store"):
        CheckpointWriter(tmp_path).save(1, tensors={"c": torch.zeros(2, dtype=torch.complex128)})


# --- keep, latest, leftovers -------------------------------------------------------------------------------------


def test_keep_last_k_and_latest_pointer(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path, keep=2)
    for step in range(1, 6):
        w.save(step, tensors=_small(step))
        assert (tmp_path / "latest").read_text().strip() == f"step-{step:08d}"
    assert [k for k, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    ck = load_checkpoint(tmp_path)
    assert ck.step == 5 and torch.equal(ck.tensors()["a.weight"], _small(5)["a.weight"])
    # The pointer decides, not the highest number; a dangling pointer falls back to the newest.
    (tmp_path / "latest").write_text("step-00000004\n")
    assert load_checkpoint(tmp_path).step == 4
    (tmp_path / "latest").write_text("step-00000009\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000005"
    (tmp_path / "latest").unlink()
    assert load_checkpoint(tmp_path).step == 5
    CheckpointWriter(tmp_path / "all", keep=None)
    w_all = CheckpointWriter(tmp_path / "all", keep=None)
    for step in range(4):
        w_all.save(step, tensors=_small(step))
    assert len(list_checkpoints(tmp_path / "all")) == 4


def test_resuming_from_an_earlier_step_replaces_the_abandoned_future(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path, keep=5)
    for step in (1, 2, 3):
        w.save(step, tensors=_small(step))
    w2 = CheckpointWriter(tmp_path, keep=5)  # a run resumed from step 1, now saving step 2 again
    w2.save(2, tensors=_small(20))
    assert [k for k, _ in list_checkpoints(tmp_path)] == [1, 2]
    ck = load_checkpoint(tmp_path)
    assert ck.step == 2 and torch.equal(ck.tensors()["a.bias"], _small(20)["a.bias"])
    assert not [p for p in tmp_path.iterdir() if "trash" in p.name]


def test_tmp_leftover_is_ignored_then_cleaned(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path)
    w.save(3, tensors=_small(3))
    crashed = tmp_path / "step-00000004.tmp"
    crashed.mkdir()
    (crashed / "stage9.model.safetensors").write_bytes(b"\x00" * 100)
    (crashed / "stage9.part.json").write_text("{\"half")
    assert load_checkpoint(tmp_path).step == 3
    only_tmp = tmp_path / "fresh"
    (only_tmp / "step-00000001.tmp").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no complete checkpoint .* unfinished ones: step-00000001.tmp"):
        load_checkpoint(only_tmp)
    CheckpointWriter(tmp_path)  # the next writer cleans up
    assert not crashed.exists()
    # Stray files of a crashed run inside the step's .tmp are not committed when the writer names its parts.
    w = CheckpointWriter(tmp_path, clean=False)
    stray = w.tmp_dir(4)
    stray.mkdir()
    (stray / "old.model.safetensors").write_bytes(b"junk")
    w.save(4, tensors=_small(4), part="stage0")
    assert sorted(p.name for p in (tmp_path / "step-00000004").iterdir()) == ["manifest.json",
                                                                             "stage0.model.safetensors"]


# --- corruption -------------------------------------------------------------------------------------------------


def _saved_with_optimizer(root: Path) -> Path:
    model = nn.Linear(16, 8)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    state, meta = optimizer_state_by_fqn(opt, model.named_parameters())
    return CheckpointWriter(root).save(1, tensors=model.state_dict(), optimizer=state, optimizer_meta=meta)


def _flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.model.safetensors", "model.optim.safetensors"])
def test_altered_tensor_file_is_detected(tmp_path: Path, name: str) -> None:
    step_dir = _saved_with_optimizer(tmp_path)
    expected = json.loads((step_dir / "manifest.json").read_text())["files"][name]["sha256"]
    _flip_byte(step_dir / name)
    with pytest.raises(CheckpointError, match=rf"{name}: sha256 is [0-9a-f]{{64}}, the manifest expects {expected}"):
        load_checkpoint(tmp_path)
    ck = load_checkpoint(tmp_path, verify="read")  # sizes still match: found on the read that hashes the file
    with pytest.raises(CheckpointError, match=rf"{name}: sha256 .* expects {expected}"):
        ck.tensors() if name.startswith("model.model") else ck.optimizer_state()


def test_truncated_and_missing_files_are_named(tmp_path: Path) -> None:
    step_dir = _saved_with_optimizer(tmp_path)
    files = json.loads((step_dir / "manifest.json").read_text())["files"]
    optim = step_dir / "model.optim.safetensors"
    optim.write_bytes(optim.read_bytes()[:-10])
    rec = files["model.optim.safetensors"]
    with pytest.raises(CheckpointError, match=rf"model.optim.safetensors has {rec['size'] - 10} bytes but the "
                                              rf"manifest expects {rec['size']} \(sha256 {rec['sha256']}\)"):
        load_checkpoint(step_dir, verify="size")
    (step_dir / "model.model.safetensors").unlink()
    expected = files["model.model.safetensors"]["sha256"]
    with pytest.raises(CheckpointError, match=rf"model.model.safetensors is missing; .*{expected}"):
        load_checkpoint(tmp_path)


def test_altered_or_damaged_manifest_is_detected(tmp_path: Path) -> None:
    step_dir = _saved_with_optimizer(tmp_path)
    manifest = step_dir / "manifest.json"
    good = manifest.read_text()
    data = json.loads(good)
    data["step"] = 2  # valid JSON, plausible, but not what was committed
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="manifest.json: the manifest's contents hash to .* records checksum"):
        load_checkpoint(tmp_path)
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="manifest.json: not valid JSON"):
        load_checkpoint(tmp_path)
    manifest.unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(step_dir)


# --- crash safety ----------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, sys, time, torch
    import stagewise.checkpoint._save as save
    import stagewise.checkpoint._write as wr
    from stagewise.checkpoint import CheckpointWriter

    def scenario(root, where):
        w = CheckpointWriter(root)
        w.save(1, tensors={"w": torch.ones(1000), "b": torch.zeros(10)})
        wr.CHUNK = 4096  # many small writes, so the kill lands in the middle of a file
        real_write, real_json = wr._write_all, save.write_json_durable
        def hang():
            print("READY", where, os.getpid(), flush=True)
            time.sleep(60)
        def slow_write(fd, data):
            real_write(fd, data)
            hang()
        def slow_json(path, data):
            if path.name == "manifest.json":
                with open(path, "w") as f:
                    f.write('{"format": "stagewise-checkpoint", "step": ')
                hang()
            real_json(path, data)
        if where == "tensor":
            wr._write_all = slow_write
        elif where == "manifest":
            save.write_json_durable = slow_json
        elif where == "latest":
            save.write_text_durable = lambda path, text: hang()
        w.save(2, tensors={"w": torch.full((100_000,), 2.0), "b": torch.ones(10)})

    # Import torch once, then one forked writer per kill point.
    pids = []
    for where in sys.argv[2:]:
        pid = os.fork()
        if pid == 0:
            try:
                scenario(os.path.join(sys.argv[1], where), where)
            finally:
                os._exit(3)  # reached only if the writer was not killed
        pids.append(pid)
    killed = [os.WIFSIGNALED(os.waitpid(pid, 0)[1]) for pid in pids]
    sys.exit(0 if all(killed) else 1)
""")


KILL_POINTS = ["tensor", "manifest", "latest"]


def test_sigkill_while_saving_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    """Three writers are SIGKILLed at one point each of saving step 2: in the middle of a tensor file, in the middle
    of the manifest, and after the rename but before ``latest`` moved. Each time the step-1 checkpoint must load,
    and the next writer must clean up and carry on."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), *KILL_POINTS], stdout=subprocess.PIPE,
                             env=env, text=True)
    ready: dict[str, int] = {}
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 40
        while len(ready) < len(KILL_POINTS) and time.monotonic() < deadline and child.poll() is None:
            parts = child.stdout.readline().split()
            if len(parts) == 3 and parts[0] == "READY":
                ready[parts[1]] = int(parts[2])
                os.kill(int(parts[2]), signal.SIGKILL)  # a real crash: no cleanup, no finally blocks
        assert sorted(ready) == sorted(KILL_POINTS), f"writers that reached their kill point: {sorted(ready)}"
        assert child.wait(timeout=20) == 0, "a writer was not killed"
    finally:
        if child.poll() is None:
            for pid in ready.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            child.kill()
            child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    for where in KILL_POINTS:
        root = tmp_path / where
        ck = load_checkpoint(root)
        assert ck.step == 1 and torch.equal(ck.tensors()["w"], torch.ones(1000)), where
        leftovers = sorted(p.name for p in root.iterdir())
        assert ("step-00000002" in leftovers) == (where == "latest"), leftovers  # renamed, `latest` never moved
        assert ("step-00000002.tmp" in leftovers) == (where != "latest"), leftovers
        if where == "tensor":
            partial = root / "step-00000002.tmp" / "model.model.safetensors"
            assert 0 < partial.stat().st_size < 400_000  # killed in the middle of the file
        w = CheckpointWriter(root)  # the next run cleans up and saves step 2 for real
        assert not (root / "step-00000002.tmp").exists()
        w.save(2, tensors={"w": torch.full((100_000,), 2.0)})
        assert load_checkpoint(root).tensors()["w"][0].item() == 2.0


# --- exact resume: optimizer and RNG ---------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))
    return torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True)


def _train(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        nn.functional.mse_loss(model(x), y).backward()  # dropout draws from the global torch RNG
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def _schedule(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_optimizer_resume_is_bitwise_exact(tmp_path: Path, kind: str) -> None:
    ref = _net()
    ref_opt = _optimizer(kind, ref.parameters())
    torch.manual_seed(1)
    _train(ref, ref_opt, _schedule(ref_opt), range(5))

    model = _net()
    opt = _optimizer(kind, model.parameters())
    sched = _schedule(opt)
    torch.manual_seed(1)
    _train(model, opt, sched, range(3))
    state, meta = optimizer_state_by_fqn(opt, model.named_parameters())
    CheckpointWriter(tmp_path).save(3, tensors=model.state_dict(), optimizer=state, optimizer_meta=meta,
                                    extra_json={"rng": rng_state_json(), "lr_scheduler": sched.state_dict()})
    torch.manual_seed(123)  # a new process: other RNG state, other weights

    ck = load_checkpoint(tmp_path)
    fresh = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    fresh.load_state_dict(ck.tensors(fresh.state_dict().keys()), strict=True)
    fresh_opt = _optimizer(kind, fresh.parameters())
    fresh_sched = _schedule(fresh_opt)  # before loading: building a scheduler resets the learning rate
    names = [n for n, _ in fresh.named_parameters()]
    load_optimizer_state(fresh_opt, fresh.named_parameters(), ck.optimizer_state(names), ck.optimizer_meta(names))
    fresh_sched.load_state_dict(json.loads(json.dumps(ck.part_extra("model")["lr_scheduler"])))
    restore_rng_state(ck.part_extra("model")["rng"])
    _train(fresh, fresh_opt, fresh_sched, range(3, 5))
    for (name, a), b in zip(ref.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), f"{kind}: {name} differs after resume"


def test_optimizer_state_reshards_from_two_stages_to_one(tmp_path: Path) -> None:
    ref = _net().eval()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    _train(ref, ref_opt, _schedule(ref_opt), range(5))

    model = _net().eval()
    named = list(model.named_parameters())
    stages = [named[:2], named[2:]]  # two pipeline stages, one optimizer each
    opts = [torch.optim.Adam([p for _, p in st], lr=1e-2) for st in stages]
    scheds = [_schedule(o) for o in opts]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        nn.functional.mse_loss(model(x), y).backward()
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
            o.zero_grad(set_to_none=True)
    w = CheckpointWriter(tmp_path)
    for i, (st, o) in enumerate(zip(stages, opts)):
        state, meta = optimizer_state_by_fqn(o, st)
        w.save_part(3, part=f"stage{i}", tensors={n: p.detach() for n, p in st}, optimizer=state, optimizer_meta=meta,
                    extra_json={"lr_scheduler": scheds[i].state_dict()})
    w.commit(3, parts=["stage0", "stage1"])

    ck = load_checkpoint(tmp_path)
    one = _net().eval()
    one.load_state_dict(ck.tensors(), strict=True)
    one_opt = torch.optim.Adam(one.parameters(), lr=1e-2)
    sched = _schedule(one_opt)
    names = [n for n, _ in one.named_parameters()]
    load_optimizer_state(one_opt, one.named_parameters(), ck.optimizer_state(names), ck.optimizer_meta(names))
    sched.load_state_dict(ck.part_extra("stage0")["lr_scheduler"])
    _train(one, one_opt, sched, range(3, 5))
    for (name, a), b in zip(ref.state_dict().items(), one.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after re-sharding 2 stages -> 1"
    with pytest.raises(ValueError, match="holds Adam state but the optimizer is SGD"):
        load_optimizer_state(torch.optim.SGD(one.parameters(), lr=0.1), one.named_parameters(), {},
                             ck.optimizer_meta(names))


def test_rng_state_round_trips_through_json() -> None:
    saved = json.loads(json.dumps(rng_state_json()))
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(4))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restore_rng_state(saved)
    again = (random.random(), np.random.rand(3).tolist(), torch.rand(4))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


# --- export -----------------------------------------------------------------------------------------------------


def test_export_tiny_gpt_strict_load_reproduces_outputs(tmp_path: Path, gpt_stages: dict[str, Any]) -> None:
    from stagewise.zoo.gpt import GPT

    spec = gpt_stages["spec"]
    _save_gpt(tmp_path / "ck", gpt_stages)
    ck = load_checkpoint(tmp_path / "ck")
    expected = spec.model.eval()(*spec.args)
    for model_arg in (None, spec.model):  # tied names from the manifest, or learned from the model
        out = export_state_dict(ck, tmp_path / "model.safetensors", model=model_arg)
        fresh = GPT(spec.model.config).eval()
        assert not torch.equal(fresh(*spec.args), expected)
        fresh.load_state_dict(load_file(str(out)), strict=True)
        assert fresh.lm_head.weight is fresh.wte.weight
        assert torch.equal(fresh(*spec.args), expected)
    from stagewise.zoo.gpt import GPTConfig

    with pytest.raises(ValueError, match="does not fit GPT"):
        export_state_dict(ck, tmp_path / "bad.safetensors", model=GPT(GPTConfig(n_layer=2)))


def test_export_pretrained_hf_gpt2(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from stagewise.zoo.hf import gpt2

    spec = gpt2()
    model = spec.model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = model.state_dict()
    stage0 = {k: v for k, v in sd.items() if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0"))}
    stage1 = {k: v for k, v in sd.items() if k not in stage0 and k != "lm_head.weight"}  # tied head: owned by stage0
    w = CheckpointWriter(tmp_path / "ck")
    w.save_part(5, part="stage0", tensors=stage0)
    w.save_part(5, part="stage1", tensors=stage1)
    w.commit(5, parts=["stage0", "stage1"], tied=tied_groups(model))
    ids = spec.kwargs["input_ids"]
    expected = model(input_ids=ids).logits
    fresh = gpt2().model
    export_pretrained(load_checkpoint(tmp_path / "ck"), fresh, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert not torch.equal(gpt2().model.eval()(input_ids=ids).logits, expected)


# --- CLI and public surface ----------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="stagewise")
    add_checkpoint_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_info_and_export(tmp_path: Path, gpt_stages: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ck"
    _save_gpt(root, gpt_stages, step=12)
    assert _cli(["checkpoint", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "step 12" in out and "stage0" in out and "stage1" in out and "all files match" in out
    assert "wte.weight = lm_head.weight" in out
    table = format_info(load_checkpoint(root))
    assert table.row_count == 2
    assert _cli(["checkpoint", "export", str(root), "--out", str(tmp_path / "m.safetensors"),
                 "--model", "stagewise.zoo.gpt:tiny_gpt"]) == 0
    exported = load_file(str(tmp_path / "m.safetensors"))
    assert torch.equal(exported["lm_head.weight"], gpt_stages["spec"].model.wte.weight)
    _flip_byte(root / "step-00000012" / "stage1.model.safetensors")
    assert _cli(["checkpoint", "info", str(root)]) == 1
    assert "stage1.model.safetensors: sha256 is" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--pretrained-dir needs --model"):
        _cli(["checkpoint", "export", str(root), "--pretrained-dir", str(tmp_path / "hf")])


def test_public_surface() -> None:
    assert set(ckpt_api.__all__) == {
        "Checkpoint", "CheckpointError", "CheckpointWriter", "Verify", "add_checkpoint_parser",
        "cmd_checkpoint_export", "cmd_checkpoint_info", "export_pretrained", "export_state_dict", "export_tensors",
        "format_info", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "load_optimizer_state",
        "optimizer_state_by_fqn", "restore_rng_state", "rng_state_json", "tied_groups",
    }
    for name in ckpt_api.__all__:
        obj = getattr(ckpt_api, name)
        if callable(obj) and name != "Verify":  # Verify is a Literal type alias
            assert obj.__doc__, f"{name} has no docstring"
