"""The model zoo: every factory builds a runnable, trainable, deterministic ModelSpec."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import default_collate

from stagewise._spec import ModelSpec, load_model_spec
from stagewise.zoo import ALL_MODELS, BASIC_MODELS, HF_MODELS, Samples, get
from stagewise.zoo.basic import load_digits_tensors
from stagewise.zoo.gpt import GPT, tiny_gpt

REPO = Path(__file__).resolve().parents[1]


def _first_batch(spec: ModelSpec, n: int) -> tuple[Any, tuple[torch.Tensor, ...]]:
    assert spec.dataset is not None
    data = spec.dataset()
    return default_collate([data[i] for i in range(n)])


def _call(spec: ModelSpec, inputs: Any) -> Any:
    """Run the model on a dataset batch; non-tensor keyword inputs (e.g. ``scale``) come from the example."""
    if isinstance(inputs, dict):
        return spec.model(**{**spec.kwargs, **inputs})
    return spec.model(*inputs, **spec.kwargs)


def _loss(spec: ModelSpec, output: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return output.loss if spec.loss is None else spec.loss(output, *targets)


def _batch_size(spec: ModelSpec) -> int:
    tensors = [t for t in (*spec.args, *spec.kwargs.values()) if isinstance(t, torch.Tensor)]
    assert tensors, "a zoo model must have at least one tensor input"
    sizes = {t.shape[0] for t in tensors}
    assert len(sizes) == 1, f"example inputs disagree on the batch dim: {sizes}"
    return sizes.pop()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_forward_backward_on_example_inputs(name: str) -> None:
    spec = ALL_MODELS[name]()
    assert isinstance(spec, ModelSpec)
    assert spec.model.training, "zoo models are built in their default (training) mode"
    assert _batch_size(spec) == 4
    assert spec.dataset is not None and len(spec.dataset()) >= 32

    # The example output is scored against the dataset's targets for 4 samples: both must have matching shapes.
    inputs, targets = _first_batch(spec, 4)
    loss = _loss(spec, spec.model(*spec.args, **spec.kwargs), targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in spec.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"

    # A dataset batch goes through the same call.
    with torch.no_grad():
        assert torch.isfinite(_loss(spec, _call(spec, inputs), targets))


@pytest.mark.parametrize("name", list(ALL_MODELS))
def test_factories_are_deterministic_and_leave_global_rng_alone(name: str) -> None:
    rng_before = torch.get_rng_state()
    a, b = ALL_MODELS[name](), ALL_MODELS[name]()
    assert torch.equal(torch.get_rng_state(), rng_before), f"{name} changed the global RNG state"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{name}: {key} differs between two calls"
    assert _same(a.args, b.args) and _same(a.kwargs, b.kwargs)
    assert a.dataset is not None and b.dataset is not None
    da, db = a.dataset(), b.dataset()
    assert len(da) == len(db) and _same(da[len(da) - 1], db[len(db) - 1])
    assert a.name == b.name


def test_different_seeds_give_different_weights() -> None:
    w0 = get("large_model")().model.state_dict()["layer1.weight"]
    w1 = get("large_model")(seed=1).model.state_dict()["layer1.weight"]
    assert not torch.equal(w0, w1)


def test_tiny_gpt_ties_lm_head_to_token_embedding() -> None:
    spec = tiny_gpt()
    model = spec.model
    assert isinstance(model, GPT)
    assert model.lm_head.weight is model.wte.weight
    # One Parameter, reachable under two names: parameters() counts it once, state_dict() lists it twice.
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False))) - 1
    assert (model.config.vocab_size, model.config.n_layer, model.config.n_embd, model.config.n_head) == (64, 4, 32, 2)
    assert spec.args[0].shape == (4, 16) and spec.args[0].dtype == torch.long
    assert spec.model(*spec.args).shape == (4, 16, 64)


def test_tiny_gpt_dataset_targets_are_next_tokens_and_learnable() -> None:
    spec = tiny_gpt(n_samples=64)
    assert spec.dataset is not None and spec.loss is not None
    (x,), (y,) = default_collate([spec.dataset()[i] for i in range(64)])
    assert torch.equal(x[:, 1:], y[:, :-1])
    torch.manual_seed(0)
    opt = torch.optim.Adam(spec.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = spec.loss(spec.model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_tiny_gpt_is_causal() -> None:
    spec = tiny_gpt()
    spec.model.eval()
    ids = spec.args[0]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64
    with torch.no_grad():
        a, b = spec.model(ids), spec.model(changed)
    assert torch.allclose(a[:, :-1], b[:, :-1]) and not torch.allclose(a[:, -1], b[:, -1])


def test_digits_dataset() -> None:
    x, y = load_digits_tensors()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    assert set(y.tolist()) == set(range(10))
    assert torch.allclose(x.mean(dim=0), torch.zeros(64), atol=1e-4)
    spec = get("mlp")()
    assert spec.dataset is not None and len(spec.dataset()) == 1797 * 4 // 5  # 80% train, 20% held out
    assert spec.evaluate is not None
    accuracy = spec.evaluate(spec.model)["accuracy"]
    assert 0.0 <= accuracy <= 0.4  # untrained: near chance on the held-out fifth
    linears = [m for m in spec.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 and linears[0].in_features == 64 and linears[-1].out_features == 10


def test_multitask_returns_both_heads() -> None:
    spec = get("multitask")()
    out = spec.model(*spec.args)
    assert set(out) == {"cls", "reg"} and out["reg"].shape == (4, 1)
    names = dict(spec.model.named_modules())
    assert "heads.cls" in names and "heads.reg" in names


def test_kwargs_model_uses_mask_and_extra() -> None:
    spec = get("kwargs_model")()
    assert set(spec.kwargs) == {"mask", "scale", "extra"} and spec.kwargs["mask"].dtype == torch.bool
    spec.model.eval()
    with torch.no_grad():
        base = spec.model(*spec.args, **spec.kwargs)
        no_mask = spec.model(*spec.args, **{**spec.kwargs, "mask": None})
        no_extra = spec.model(*spec.args, **{**spec.kwargs, "extra": None})
        other_scale = spec.model(*spec.args, **{**spec.kwargs, "scale": 2.0})
    assert not torch.allclose(base, no_mask) and not torch.allclose(base, no_extra)
    assert not torch.allclose(base, other_scale)


def test_hf_registry_and_sizes() -> None:
    assert {"gpt2", "bert", "llama", "t5"} <= HF_MODELS.keys() and len(HF_MODELS) >= 14
    get("hf_gpt2")()  # import transformers outside the timed loop
    for name, factory in HF_MODELS.items():
        start = time.perf_counter()
        spec = factory()
        assert time.perf_counter() - start < 2.0, f"building {name} took too long"
        assert spec.loss is None and "labels" in spec.kwargs, name
        assert sum(p.numel() for p in spec.model.parameters()) < 100_000, f"{name} is not tiny"
        assert spec.model.config.num_hidden_layers == 2, name
        if "input_ids" in spec.kwargs:
            assert spec.kwargs["input_ids"].shape == (4, 12) and spec.kwargs["attention_mask"].dtype == torch.long
            assert bool((spec.kwargs["attention_mask"] == 1).all())


def test_hf_models_keep_config_defaults() -> None:
    spec = get("hf_llama")()
    config = spec.model.config
    assert config.use_cache is True
    assert config._attn_implementation == "sdpa"
    assert get("hf_gpt2")().model.config.attn_pdrop == 0.1  # dropout left at its default


def test_get_lists_names_on_unknown_model() -> None:
    with pytest.raises(ValueError, match="tiny_gpt") as info:
        get("no_such_model")
    assert "no_such_model" in str(info.value) and "hf_llama" in str(info.value)
    assert set(BASIC_MODELS) <= set(ALL_MODELS)


def test_samples_checks_lengths_and_splits_along_dim0() -> None:
    data = Samples({"a": torch.arange(6).view(3, 2)}, (torch.arange(3),))
    assert len(data) == 3
    inputs, targets = data[1]
    assert torch.equal(inputs["a"], torch.tensor([2, 3])) and torch.equal(targets[0], torch.tensor(1))
    with pytest.raises(ValueError, match="dim 0"):
        Samples((torch.zeros(3),), (torch.zeros(4),))


def test_example_file_loads_through_model_string() -> None:
    spec = load_model_spec(f"{REPO / 'examples' / 'large_model.py'}:build")
    assert spec.name == "large_model"
    assert spec.model(*spec.args).shape == (4, 40)
    names = [n for n, _ in spec.model.named_children()]
    assert names == ["layer1", "layer2", "layer3"]
    zoo_spec = load_model_spec("stagewise.zoo.basic:large_model")
    assert torch.equal(zoo_spec.model.layer1.weight, spec.model.layer1.weight)
