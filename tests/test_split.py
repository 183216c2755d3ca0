"""The splitter: every zoo model, cut into 2..4 stages, reproduces the model's outputs and gradients exactly.

Each stage chain is checked twice: run in one process (``SplitModel.run``), and *boundary-detached*, the way separate
processes run it: every received tensor is a contiguous copy with no autograd history, and backward goes stage by
stage from the last one, feeding the received tensors' gradients back as the previous stage's output gradients.
One capture per model is re-cut for every stage count (``SplitModel.recut``) to keep the file fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stagewise._spec import ModelSpec
from stagewise.split import Partition, SplitError, SplitModel, split
from stagewise.split._balance import bottleneck, min_max_cuts
from stagewise.split._capture import input_leaves
from stagewise.split._tree import flatten, unflatten
from stagewise.zoo import ALL_MODELS
from stagewise.zoo.basic import kwargs_model, large_model, multitask, resnet

OUT_ATOL = 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 4e-5


# ------------------------------------------------------------------------------------------------------------------
# Reference runs and comparisons.


def _targets(spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    """Targets for the example batch (from the spec's dataset) when the loss is ``spec.loss``."""
    if spec.loss is None or spec.dataset is None:
        return ()
    data = spec.dataset()
    batch = next(t for t in flatten((spec.args, spec.kwargs))[0]).shape[0]
    first = [data[i][1] for i in range(batch)]
    return tuple(torch.stack([sample[j] for sample in first]) for j in range(len(first[0])))


def _loss(spec: ModelSpec, out: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The model's loss plus the mean of every float output, so every output (caches too) carries a gradient."""
    main = out.loss if spec.loss is None else spec.loss(out, *targets)
    extra = [t.float().mean() for t in flatten(out)[0] if t.is_floating_point() and t.requires_grad]
    return main + sum(extra)


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in _params(model).items()}


def _zero(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def assert_same_output(ref: Any, out: Any, what: str) -> None:
    assert type(out) is type(ref), f"{what}: output type {type(out).__name__} != {type(ref).__name__}"
    a, spec_a = flatten(ref)
    b, spec_b = flatten(out)
    assert spec_a == spec_b, f"{what}: output structure differs"
    for i, (x, y) in enumerate(zip(a, b)):
        assert y.dtype == x.dtype and y.shape == x.shape, f"{what}: leaf {i} is {y.dtype}{list(y.shape)}"
        if x.is_floating_point():
            diff = (x.detach() - y.detach()).abs().max().item() if x.numel() else 0.0
            assert diff <= OUT_ATOL, f"{what}: output leaf {i} differs by {diff}"
        else:
            assert torch.equal(x, y), f"{what}: integer/bool output leaf {i} differs"


def assert_same_grads(ref: dict[str, torch.Tensor | None], got: dict[str, torch.Tensor | None], what: str) -> None:
    assert ref.keys() == got.keys()
    for name, g in ref.items():
        h = got[name]
        if g is None or not g.any():
            assert h is None or not h.any(), f"{what}: {name} has a gradient the model does not give it"
            continue
        assert h is not None, f"{what}: parameter {name} got no gradient"
        torch.testing.assert_close(h, g, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"{what}: {name}: {m}")


def run_detached(sm: SplitModel, args: tuple[Any, ...], kwargs: dict[str, Any],
                 loss_of: Callable[[Any], torch.Tensor], head: str | None = None) -> Any:
    """Run the stages as separate processes would: copies across boundaries, backward stage by stage."""
    cap, stages = sm.stages_for(args, kwargs)
    leaves, names, _ = input_leaves(args, kwargs)
    inputs = dict(zip(names, leaves))
    outputs: list[Any] = [None] * len(cap.output_names)
    sent: dict[int, dict[str, torch.Tensor]] = {}
    received: dict[int, dict[str, torch.Tensor]] = {}
    ran = []
    for stage in stages:
        if head is not None and stage.spec.head not in (None, head):
            continue
        ran.append(stage)
        parent = stage.spec.parent
        recv = []
        for v in stage.spec.recv:
            assert parent is not None
            t = sent[parent][v.name]
            assert list(t.shape) == v.shape and str(t.dtype) == f"torch.{v.dtype}", f"{v} vs {t.dtype}{t.shape}"
            copy = t.detach().clone(memory_format=torch.contiguous_format)  # what a transport delivers
            recv.append(copy.requires_grad_(t.requires_grad))
        received[stage.index] = {v.name: r for v, r in zip(stage.spec.recv, recv)}
        send, outs = stage(recv, inputs)
        sent[stage.index] = {v.name: x for v, x in zip(stage.spec.send, send)}
        for leaf, value in zip(stage.output_index, outs):
            outputs[leaf] = value
    result = unflatten(cap.out_spec, outputs)
    if head is not None:
        result = {k: v for k, v in result.items() if v is not None}
    loss_of(result).backward()
    for stage in reversed(ran):  # children have larger indices than their parent
        tensors, grads = [], []
        for v, x in zip(stage.spec.send, sent[stage.index].values()):
            if not x.requires_grad:
                continue
            g = torch.zeros_like(x)
            for child in ran:
                r = received.get(child.index, {}).get(v.name) if child.spec.parent == stage.index else None
                if r is not None and r.grad is not None:
                    g = g + r.grad
            tensors.append(x)
            grads.append(g)
        if tensors:
            torch.autograd.backward(tensors, grads)
    return result


@functools.cache
def _zoo(name: str) -> tuple[ModelSpec, SplitModel, Any, dict[str, torch.Tensor | None], tuple[torch.Tensor, ...]]:
    """A zoo model in eval mode, split into 2 stages once, with its reference output and gradients."""
    spec = ALL_MODELS[name]()
    spec.model.eval()
    targets = _targets(spec)
    _zero(spec.model)
    ref = spec.model(*spec.args, **spec.kwargs)
    _loss(spec, ref, targets).backward()
    grads = _grads(spec.model)
    _zero(spec.model)
    return spec, split(spec, stages=2, by="params"), ref, grads, targets


def check_split(spec: ModelSpec, sm: SplitModel, ref: Any, ref_grads: dict[str, torch.Tensor | None],
                targets: tuple[torch.Tensor, ...], what: str) -> None:
    """Outputs and gradients of ``sm`` match the model's, in one process and boundary-detached."""
    _zero(spec.model)
    out = sm.run(spec.args, spec.kwargs)
    assert_same_output(ref, out, what)
    _loss(spec, out, targets).backward()
    assert_same_grads(ref_grads, _grads(spec.model), f"{what} (one process)")
    _zero(spec.model)
    out = run_detached(sm, spec.args, spec.kwargs, lambda o: _loss(spec, o, targets))
    assert_same_output(ref, out, f"{what} (detached)")
    assert_same_grads(ref_grads, _grads(spec.model), f"{what} (detached)")
    _zero(spec.model)


def check_partition(sm: SplitModel) -> None:
    """Every weight lives in exactly one stage, and stage modules hold exactly the stage's own weights."""
    owned = [fqn for stage in sm.stages for fqn in stage.spec.params]
    assert len(owned) == len(set(owned)), f"a weight is owned by two stages: {owned}"
    state = dict(sm.model.named_parameters()) | dict(sm.model.named_buffers())
    for stage in sm.stages:
        mine = dict(stage.module.named_parameters()) | dict(stage.module.named_buffers())
        assert set(mine) <= set(stage.spec.params) | {n for n in mine if n.startswith("_stagewise_const")}
        for fqn, t in mine.items():
            if fqn in state:
                assert t is state[fqn], f"stage {stage.index} copied {fqn} instead of sharing it"
    assert Partition.from_json(sm.partition.to_json()) == sm.partition


# ------------------------------------------------------------------------------------------------------------------
# Every zoo model at every stage count.


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_zoo_model_split_is_exact(name: str) -> None:
    spec, sm, ref, grads, targets = _zoo(name)
    n_units = len(sm.partition.units)
    assert n_units >= 3, f"{name} has only {n_units} units"
    for k in range(2, min(4, n_units) + 1):
        cut = sm if k == 2 else sm.recut(stages=k)
        assert cut.partition.num_stages == k and [s.index for s in cut.stages] == list(range(k))
        assert [u for s in cut.partition.stages for u in s.units] == cut.partition.unit_names()
        check_partition(cut)
        check_split(spec, cut, ref, grads, targets, f"{name} in {k} stages")


def test_recut_equals_a_fresh_split() -> None:
    spec, sm, *_ = _zoo("tiny_gpt")
    fresh = split(spec, stages=3, by="uniform")
    again = sm.recut(stages=3, by="uniform")
    assert again.partition == fresh.partition
    assert sm.partition.num_stages == 2, "recut must not change the original"
    with pytest.raises(SplitError, match="not timed"):
        sm.recut(by="time")


@pytest.mark.parametrize("name", ["tiny_gpt", "hf_gpt2"])
def test_tied_weight_is_one_parameter_owned_by_one_stage(name: str) -> None:
    spec, sm, ref, grads, targets = _zoo(name)
    model = spec.model
    emb = model.wte if name == "tiny_gpt" else model.transformer.wte
    assert model.lm_head.weight is emb.weight
    fqn = "wte.weight" if name == "tiny_gpt" else "transformer.wte.weight"
    for k in (2, 3):
        cut = sm if k == 2 else sm.recut(stages=k)
        owners = [s for s in cut.stages if fqn in s.spec.params]
        assert [s.index for s in owners] == [0], "the embedding stage owns the tied weight"
        assert owners[0].module.get_parameter(fqn) is emb.weight
        last = cut.stages[-1]
        crossing = [v for v in last.spec.recv if v.name == fqn]
        assert crossing and crossing[0].kind == "parameter" and crossing[0].shape == list(emb.weight.shape)
        assert all(fqn not in s.spec.params for s in cut.stages[1:])
        assert not any(p is emb.weight for p in last.module.parameters())
        check_split(spec, cut, ref, grads, targets, f"{name} tied, {k} stages")


def test_albert_shared_layer_called_at_two_depths() -> None:
    spec, sm, ref, grads, targets = _zoo("hf_albert")
    layer = "albert.encoder.albert_layer_groups.0.albert_layers.0"
    assert [u for u in sm.partition.unit_names() if u.startswith(layer)] == [layer, f"{layer}@1"]
    cut = sm.recut(cuts=[f"{layer}@1"])  # the two calls of the shared layer land in different stages
    assert cut.partition.by == "cuts" and cut.stages[1].spec.units[0] == f"{layer}@1"
    shared = [v for v in cut.stages[1].spec.recv if v.kind == "parameter"]
    assert any(v.name.startswith(layer) for v in shared), "the shared layer's weights cross as parameters"
    check_partition(cut)
    check_split(spec, cut, ref, grads, targets, "albert cut between the shared layer's calls")


# ------------------------------------------------------------------------------------------------------------------
# Cost methods, named cuts, errors, JSON.


def test_cost_methods() -> None:
    spec, sm, *_ = _zoo("tiny_gpt")
    units = sm.partition.units
    uni = sm.recut(stages=3, by="uniform")
    assert uni.partition.by == "uniform" and sorted(len(s.units) for s in uni.partition.stages) == [3, 3, 3]
    par = sm.recut(stages=3, by="params")
    costs = [float(u.params) for u in units]
    assert par.partition.starts == min_max_cuts(costs, 3)
    assert sum(u.params for u in units) == sum(p.numel() for p in spec.model.parameters())
    assert bottleneck(costs, par.partition.starts) <= bottleneck(costs, uni.partition.starts)
    timed = split(large_model(), stages=2, by="time", repeats=1)
    assert timed.partition.by == "time"
    assert all(u.forward_ms > 0 and u.backward_ms > 0 for u in timed.partition.units)
    assert timed.recut(stages=3).partition.starts == [0, 1, 2]
    with pytest.raises(SplitError, match="unknown cost 'flops'; use one of uniform, params, time"):
        split(large_model(), by="flops")


def test_cuts_by_name() -> None:
    spec, sm, ref, grads, targets = _zoo("tiny_gpt")
    cut = split(spec, cuts=["blocks.1", "ln_f"])
    assert cut.partition.by == "cuts" and cut.partition.starts == [0, 4, 7]
    assert [s.units[0] for s in cut.partition.stages] == ["wte", "blocks.1", "ln_f"]
    check_split(spec, cut, ref, grads, targets, "tiny_gpt cut at blocks.1, ln_f")


def test_clear_errors() -> None:
    spec = large_model()
    with pytest.raises(SplitError, match=r"LargeModel has 3 units \(layer1, layer2, layer3\); it cannot be cut into "
                                         r"5 stages\. Use --stages 3 or fewer"):
        split(spec, stages=5)
    with pytest.raises(SplitError, match="unknown unit name 'layer9'.*valid names: 'layer1', 'layer2', 'layer3'"):
        split(spec, cuts=["layer9"])
    with pytest.raises(SplitError, match=r"LargeModel has no sub-module 'encoder'; its children are \['layer1'"):
        split(spec, submodels=["encoder", "layer2"])
    with pytest.raises(SplitError, match="either submodels or tasks"):
        split(spec, submodels=["layer1"], tasks=["layer2"])
    with pytest.raises(SplitError, match="stages must be at least 1"):
        split(spec, stages=0)
    with pytest.raises(SplitError, match="cannot be re-cut|sub-model split has one stage"):
        split(spec, submodels=["layer1", "layer3"]).recut(stages=2)


def test_partition_json_round_trip(tmp_path: Any) -> None:
    _, sm, *_ = _zoo("hf_t5")
    part = sm.partition
    assert Partition.from_json(part.to_json()) == part
    path = tmp_path / "partition.json"
    part.to_json(path)
    back = Partition.from_json(path)
    assert back == part and back.stages[1].recv == part.stages[1].recv and back.capture == "graph"
    with pytest.raises(ValueError, match="Partition.mode"):
        Partition.from_dict({**part.to_dict(), "mode": "rows"})


# ------------------------------------------------------------------------------------------------------------------
# Sub-model and task splits.


def test_submodel_split_t5_encoder_decoder() -> None:
    spec, _, ref, grads, targets = _zoo("hf_t5")
    sm = split(spec, submodels=["encoder", "decoder"])
    assert sm.partition.mode == "submodels" and sm.partition.submodels == ["encoder", "decoder"]
    assert sm.partition.num_stages == 2
    assert "encoder" in sm.stages[0].spec.units and "decoder" in sm.stages[1].spec.units
    check_partition(sm)
    check_split(spec, sm, ref, grads, targets, "t5 encoder | decoder")


def test_submodel_split_resnet() -> None:
    spec = resnet()
    spec.model.eval()
    sm = split(spec, submodels=["stem", "blocks", "head"])
    assert [s.units for s in sm.partition.stages] == [["stem"], ["blocks"], ["head"]]
    targets = _targets(spec)
    ref = spec.model(*spec.args)
    _loss(spec, ref, targets).backward()
    grads = _grads(spec.model)
    check_split(spec, sm, ref, grads, targets, "resnet stem | blocks | head")
    with pytest.raises(SplitError, match="execution order"):
        split(spec, submodels=["head", "stem"])


def test_task_split_trunk_and_heads() -> None:
    spec = multitask()
    spec.model.eval()
    model = spec.model
    targets = _targets(spec)
    ref = model(*spec.args)
    _loss(spec, ref, targets).backward()
    grads = _grads(model)
    _zero(model)
    sm = split(spec, stages=2, tasks=["heads.cls", "heads.reg"])
    stages = sm.partition.stages
    assert sm.partition.mode == "tasks" and len(stages) == 4
    assert [s.head for s in stages] == [None, None, "heads.cls", "heads.reg"]
    assert [s.parent for s in stages] == [None, 0, 1, 1]
    assert all(u.startswith("trunk") for s in stages[:2] for u in s.units)
    check_split(spec, sm, ref, grads, targets, "multitask trunk x2 + heads")

    # One head: the other head's stage never runs, and only the trunk and that head get gradients.
    def refuse(*_: Any) -> None:
        raise AssertionError("the reg head ran")

    sm.stages[3].module.forward = refuse
    ref_cls = model(*spec.args)["cls"]
    out = sm.run(spec.args, head="heads.cls")
    assert list(out) == ["cls"]
    assert_same_output(ref_cls, out["cls"], "cls head")
    out = run_detached(sm, spec.args, {}, lambda o: F.cross_entropy(o["cls"], targets[0]), head="heads.cls")
    assert out.keys() == {"cls"}
    _zero(model)
    F.cross_entropy(model(*spec.args)["cls"], targets[0]).backward()
    cls_grads = _grads(model)
    assert all(g is None for n, g in cls_grads.items() if n.startswith("heads.reg"))
    _zero(model)
    out = sm.run(spec.args, head="heads.cls")
    F.cross_entropy(out["cls"], targets[0]).backward()
    assert_same_grads(cls_grads, _grads(model), "cls head only")
    with pytest.raises(ValueError, match="unknown task head 'heads.x'"):
        sm.run(spec.args, head="heads.x")


# ------------------------------------------------------------------------------------------------------------------
# What crosses a cut: keyword inputs, masks, integer tensors, early outputs.


def test_kwargs_model_inputs_go_to_the_stage_that_reads_them() -> None:
    spec = kwargs_model()
    spec.model.eval()
    assert spec.kwargs["mask"].dtype == torch.bool
    sm = split(spec, cuts=["layer2", "head"])
    first, middle, last = sm.partition.stages
    assert first.inputs == ["arg0"]
    assert "mask" in middle.inputs and "extra" not in middle.inputs
    assert last.inputs == ["extra"], "only the head reads `extra`"
    targets = _targets(spec)
    ref = spec.model(*spec.args, **spec.kwargs)
    _loss(spec, ref, targets).backward()
    check_split(spec, sm, ref, _grads(spec.model), targets, "kwargs model")
    # Another batch size is captured once for its own signature and still exact.
    args = (spec.args[0][:2],)
    kwargs = {**spec.kwargs, "mask": spec.kwargs["mask"][:2], "extra": spec.kwargs["extra"][:2]}
    assert_same_output(spec.model(*args, **kwargs), sm.run(args, kwargs), "kwargs model, batch 2")
    _, stages2 = sm.stages_for(args, kwargs)
    assert stages2[1].spec.recv[0].shape[0] == 2 and sm.stages[1].spec.recv[0].shape[0] == 4
    with pytest.raises(ValueError, match="stage 2 needs model input 'extra'"):
        sm.stages[2](sm.stages[1](sm.stages[0]([], {"arg0": spec.args[0]})[0], {"mask": spec.kwargs["mask"]})[0], {})


class MaskedEncoder(nn.Module):
    """Glue builds an expanded (non-contiguous) bool mask and int positions once; every layer uses them."""

    def __init__(self, d: int = 16, n: int = 3, vocab: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(64, d)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.out = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = ids.shape
        mask = attention_mask[:, None, :].bool().expand(B, T, T)  # (B, T, T) stride 0 on dim 1
        positions = attention_mask.long().cumsum(-1) - 1  # (B, T) int64
        x = self.emb(ids)
        first = None
        for layer in self.layers:
            scores = (x @ x.transpose(1, 2)).masked_fill(~mask, -1e4).softmax(-1)  # (B, T, T)
            x = torch.tanh(layer(scores @ x) + self.pos(positions.clamp(min=0)))
            first = x if first is None else first
        assert first is not None
        return self.out(x), first  # the second output is produced by the first layer


def test_masks_ints_and_early_outputs_cross_cuts() -> None:
    torch.manual_seed(0)
    model = MaskedEncoder().eval()
    ids = torch.randint(0, 32, (2, 6))
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    spec = ModelSpec(model=model, args=(ids, am))
    loss = lambda o: o[0].square().mean() + o[1].mean()  # noqa: E731
    ref = model(ids, am)
    loss(ref).backward()
    grads = _grads(model)
    _zero(model)
    sm = split(spec, cuts=["layers.1", "layers.2"])
    recv = {v.dtype for s in sm.partition.stages[1:] for v in s.recv}
    assert {"bool", "int64", "float32"} <= recv, recv
    # The mask crosses as the expanded view and the early output is sent on to the last stage.
    _, stages = sm.stages_for(spec.args, {})
    send0 = stages[0]([], {"arg0": ids, "arg1": am})[0]
    masks = [t for t in send0 if t.dtype == torch.bool]
    assert masks and not masks[0].is_contiguous() and 0 in masks[0].stride()
    assert sm.partition.stages[-1].outputs == ["0", "1"] and not sm.partition.stages[0].outputs
    out = sm.run(spec.args, {})
    assert_same_output(ref, out, "masked encoder")
    loss(out).backward()
    assert_same_grads(grads, _grads(model), "masked encoder")
    _zero(model)
    out = run_detached(sm, spec.args, {}, loss)
    assert_same_output(ref, out, "masked encoder detached")
    assert_same_grads(grads, _grads(model), "masked encoder detached")


# ------------------------------------------------------------------------------------------------------------------
# Fallback at module boundaries when torch.export cannot capture forward.


class Gate(nn.Module):
    """A block with a Python branch on a tensor value: torch.export cannot capture it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.relu(self.norm(self.lin(x)))
        return self.norm(self.lin(x)) * 0.5


class NotAChainModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Gate(8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + x  # the residual makes it more than a chain of calls


def test_fallback_splits_a_data_dependent_chain_at_module_boundaries() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), Gate(8), nn.Sequential(nn.Linear(8, 8), Gate(8)), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    spec = ModelSpec(model=model, args=(x,), loss=lambda o, t: F.cross_entropy(o, t))
    targets = (torch.tensor([0, 1, 2, 0, 1]),)
    ref = model(x)
    _loss(spec, ref, targets).backward()
    grads = _grads(model)
    _zero(model)
    sm = split(spec, stages=3, by="params")
    part = sm.partition
    assert part.capture == "modules" and part.unit_names() == ["0", "1", "2.0", "2.1", "3"]
    assert Partition.from_json(part.to_json()) == part
    for stage in sm.stages:  # original FQNs, the model's own Parameter objects
        names = [n for n, _ in stage.module.named_parameters()]
        assert names == [p for p in stage.spec.params if not p.endswith(("running_mean", "running_var", "tracked"))]
        assert all(stage.module.get_parameter(n) is model.get_parameter(n) for n in names)
    assert part.stages[1].recv[0].shape == [5, 8] and part.stages[0].inputs == ["arg0"]
    for k in (2, 3, 4):
        cut = sm.recut(stages=k)
        assert cut.partition.capture == "modules" and cut.partition.num_stages == k
        check_split(spec, cut, ref, grads, targets, f"fallback chain, {k} stages")
    assert_same_output(model(x[:2]), sm.run((x[:2],)), "fallback chain, batch 2")
    named = split(spec, cuts=["2.1"])
    assert named.partition.by == "cuts" and named.partition.starts == [0, 3]
    check_split(spec, named, ref, grads, targets, "fallback chain cut at 2.1")
    # Probing and timing a training-mode model leaves its batch-norm statistics as they were.
    model.train()
    before = model[1].norm.running_mean.clone()
    timed = split(model, (x,), stages=2, by="time", repeats=1)
    assert torch.equal(model[1].norm.running_mean, before)
    assert timed.partition.training and all(u.forward_ms > 0 for u in timed.partition.units)


def test_fallback_refuses_a_model_that_is_not_a_chain() -> None:
    with pytest.raises(SplitError) as info:
        split(NotAChainModel(), (torch.randn(4, 8),), stages=2)
    msg = str(info.value)
    assert "torch.export could not capture NotAChainModel.forward: GuardOnDataDependentSymNode" in msg
    assert "if x.sum() > 0:" in msg, "the message points at the failing line"
    assert "module-boundary fallback does not apply" in msg and "'b' unchanged" in msg
    assert "export-friendly" in msg and "--submodels" in msg


def test_fallback_refuses_to_split_a_shared_block_across_stages() -> None:
    torch.manual_seed(0)
    gate = Gate(6)
    model = nn.Sequential(nn.Linear(3, 6), gate, gate, nn.Linear(6, 2)).eval()  # one block called twice
    sm = split(model, (torch.randn(4, 3),), cuts=["3"])
    assert sm.partition.unit_names() == ["0", "1", "1@1", "3"] and sm.partition.starts == [0, 3]
    assert_same_output(model(torch.ones(4, 3)), sm.run((torch.ones(4, 3),)), "shared block in one stage")
    with pytest.raises(SplitError, match="weight '1.lin.weight' .*also used as '1.lin.weight' by stage 1; the "
                                         "module-boundary fallback cannot share a weight between stages"):
        sm.recut(cuts=["1@1"])


def test_fallback_refuses_multiple_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = Gate(4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.g(x + y)

    with pytest.raises(SplitError, match="single tensor input"):
        split(TwoInputs(), (torch.randn(3, 4), torch.randn(3, 4)))


def test_stage_interface() -> None:
    spec, sm, *_ = _zoo("large_model")
    s0, s1 = sm.stages
    assert repr(s0).startswith("Stage(0: layer1") and s1.spec.parent == 0
    with pytest.raises(ValueError, match="stage 1 expects 1 received values, got 0"):
        s1([], {})
    send, outs = s0([], {"arg0": spec.args[0]})
    assert outs == [] and len(send) == len(s0.spec.send)
    send2, outs2 = s1(send, {})
    assert send2 == [] and s1.output_index == [0]
    assert torch.equal(outs2[0], spec.model(*spec.args))
    assert [v.nbytes for v in s0.spec.send] == [t.numel() * t.element_size() for t in send]
