"""The planner and big models (#12): profiling never holds the whole model, and the memory a plan predicts per device
(weights, gradients, optimizer state, activations) is what the training ranks measure."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stagewise import load_model_spec
from stagewise.launch import profile_model
from stagewise.plan import Cluster, Node, Plan, profile_chain, search
from stagewise.split import held_param_bytes, input_leaves, params_on_meta, split, time_units
from stagewise.train import TrainConfig, Trainer

SRC = str(Path(__file__).resolve().parents[1] / "src")
GPT = "stagewise.zoo.gpt:tiny_gpt"


def _meta_spec(target: str):  # noqa: ANN202 (a ModelSpec)
    with params_on_meta():
        return load_model_spec(target)


def test_profiling_a_meta_model_holds_one_unit_at_a_time_and_profiles_as_the_built_one() -> None:
    spec = _meta_spec(GPT)
    sm = split(spec.model, spec.args, spec.kwargs, stages=1)
    cap, _ = sm.stages_for(spec.args, spec.kwargs)
    leaves, names, _ = input_leaves(spec.args, spec.kwargs)
    timed = time_units(cap, dict(zip(names, leaves)), repeats=1)
    units = sm.partition.units
    # Each unit was timed holding its own weights only, and nothing is left behind.
    assert timed.held_bytes == [u.param_bytes for u in units]
    assert max(timed.held_bytes) < sum(u.param_bytes for u in units) / 3
    assert held_param_bytes(spec.model) == 0 and all(p.is_meta for p in spec.model.parameters())
    assert all(t.grad is None for t in spec.model.parameters())

    # The same profile as the model built for real: units, bytes, shapes, saved activations (times are noise).
    meta = profile_chain(spec, rows=[2, 4], repeats=1)
    real = profile_chain(load_model_spec(GPT), rows=[2, 4], repeats=1)
    assert held_param_bytes(spec.model) == 0
    assert [dataclass_bytes(u) for u in meta.units] == [dataclass_bytes(u) for u in real.units]
    assert meta.param_shapes == real.param_shapes and meta.saved_bytes == real.saved_bytes
    assert len(meta.forward_ms) == 2 and all(len(t) == len(units) for t in meta.forward_ms + meta.backward_ms)
    assert all(t > 0 for t in meta.loss_forward_ms + meta.loss_backward_ms)
    assert meta.saved_bytes[-1] > meta.saved_bytes[0] > 0  # the loss's saved logits count in the last unit


def dataclass_bytes(u) -> tuple:  # noqa: ANN001
    return u.name, u.params, u.param_bytes, u.out_bytes


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    from stagewise._spec import ModelSpec
    from stagewise.plan import profile_chain
    from stagewise.split import params_on_meta

    def build(units):
        return nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(units)])

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

    torch.set_num_threads(1)
    profile_chain(ModelSpec(model=build(1), args=(torch.randn(2, 4096),)), rows=[1], repeats=1)  # warm up
    how = sys.argv[1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM): the warm-up's own peak does not count
    before = status("VmRSS")
    if how == "meta":
        with params_on_meta():
            model = build(8)
    else:
        model = build(8)
    profile = profile_chain(ModelSpec(model=model, args=(torch.randn(2, 4096),)), rows=[1], repeats=1)
    print(json.dumps({"growth": status("VmHWM") - before, "model": sum(u.param_bytes for u in profile.units)}))
""")


def _rss_growth(how: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, how], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_profiling_peak_rss_grows_by_about_one_unit_not_the_model() -> None:
    # 8 units of 64 MiB (512 MiB of weights; blocks this large go back to the OS when freed, so RSS follows what is
    # held). Growth = peak RSS while profiling (VmHWM, reset after a warm-up) - RSS before it. From the meta device it
    # stays at a few units (one unit's weights and gradients at a time; measured 3 units), well under the model;
    # built for real it is the whole model.
    meta = _rss_growth("meta")
    assert meta["model"] == 8 * (4096 * 4096 + 4096) * 4
    assert meta["growth"] < 0.6 * meta["model"], meta
    real = _rss_growth("real")
    assert real["growth"] > 0.95 * meta["model"], real


@pytest.mark.parametrize(("optimizer", "schedule"), [("adam", "1f1b"), ("sgd", "gpipe")])
def test_plan_memory_per_device_matches_what_the_training_ranks_measure(optimizer: str, schedule: str) -> None:
    # Plan tiny_gpt on 2 devices (2 stages, 4 microbatches of 4 rows), train one step with the plan's layout, and
    # compare each rank's prediction with what it measured on that step (stagewise.train._memory):
    # - weights and gradients: bytes of real tensors, so they must be equal;
    # - optimizer state: Adam's equal but for the step counters torch keeps per parameter tensor (a few bytes each);
    # - activations: the peak of bytes saved for backward under the schedule, predicted from each unit's saved bytes
    #   measured once at 8 rows, scaled to 4 rows and multiplied by the microbatches alive at the peak. The measured
    #   side counts the same tensors across the real interleaving of forwards and backwards, so the two agree up to
    #   what does not scale with rows (integer inputs, rounding): within 5%.
    spec = _meta_spec(GPT)
    profile = profile_model(spec, rows=[4, 8], repeats=1, optimizer=None)
    cluster = Cluster(nodes=[Node(name="box", devices=2, memory_bytes=2**34)])
    plans = search(profile, cluster, global_batch=16, optimizer=optimizer, schedules=[schedule], limit=None)
    plan = next(p for p in plans if p.stages == 2 and p.microbatches == 4)
    plan = Plan.from_json(plan.to_json())  # what `stagewise plan --json` hands to `stagewise train --plan`
    result = Trainer(TrainConfig(model=GPT, steps=1, optimizer=optimizer, **plan.to_train_kwargs())).fit()
    assert len(result.memory) == 2
    for r, measured in enumerate(result.memory):
        assert measured["weights"] == plan.weight_bytes[r]
        assert measured["gradients"] == plan.gradient_bytes[r]
        if optimizer == "adam":
            tensors = sum(1 for _ in spec.model.parameters())
            extra = measured["optimizer"] - plan.optimizer_bytes[r]
            assert 0 <= extra <= 8 * tensors, (measured, plan.optimizer_bytes)
        else:  # the plan counts a momentum buffer that SGD without momentum never makes (STATE_FACTORS: on purpose)
            assert measured["optimizer"] == 0 and plan.optimizer_bytes[r] == plan.weight_bytes[r]
        assert measured["activations"] == pytest.approx(plan.activation_bytes[r], rel=0.05), (r, measured, plan)
        assert sum(measured.values()) - measured["optimizer"] == pytest.approx(
            plan.memory_bytes[r] - plan.optimizer_bytes[r], rel=0.05)
    # Rank 0 by hand: the microbatches alive at its peak x its units' saved bytes scaled from 8 rows to 4.
    live = 2 if schedule == "1f1b" else 4
    first = [u.name for u in profile.units].index(plan.cut[1])
    assert plan.activation_bytes[0] == -(-live * sum(profile.saved_bytes[:first]) * 4 // 8)


def test_plan_memory_parts_round_trip_and_must_add_up() -> None:
    torch.manual_seed(0)
    spec = _meta_spec("stagewise.zoo.basic:large_model")
    profile = profile_chain(spec, rows=[4], repeats=1)
    cluster = Cluster(nodes=[Node(name="box", devices=2, memory_bytes=2**30)])
    plan = search(profile, cluster, global_batch=4, optimizer="adam")[0]
    parts = [plan.weight_bytes, plan.gradient_bytes, plan.optimizer_bytes, plan.activation_bytes]
    assert [sum(x) for x in zip(*parts)] == plan.memory_bytes
    assert plan.optimizer_bytes == [2 * w for w in plan.weight_bytes] == [2 * g for g in plan.gradient_bytes]
    assert Plan.from_json(plan.to_json()) == plan
    data = plan.to_dict()
    data["activation_bytes"] = [a + 1 for a in data["activation_bytes"]]
    with pytest.raises(ValueError, match="must be the sum of weights, gradients, optimizer state and activations"):
        Plan.from_dict(data)
    old = {k: v for k, v in plan.to_dict().items() if not k.endswith("_bytes") or k in ("memory_bytes",
                                                                                           "device_memory_bytes")}
    assert Plan.from_dict(old).weight_bytes == []  # a plan written before the parts existed still reads
    serve = search(profile, cluster, global_batch=4, mode="serve")[0]
    assert serve.gradient_bytes == serve.optimizer_bytes == [0] * serve.stages
