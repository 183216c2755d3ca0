"""Big models: built on the meta device, captured without weights, materialised stage by stage (issue #12)."""

from __future__ import annotations

import pytest
import torch

from stagewise._spec import ModelSpec, as_model_spec, load_model_spec
from stagewise.split import flatten, held_param_bytes, materialise, params_on_meta, split

MODELS = ["stagewise.zoo.hf:llama", "stagewise.zoo.hf:gpt2", "stagewise.zoo.hf:bert", "stagewise.zoo.gpt:tiny_gpt",
          "stagewise.zoo.basic:mlp"]


def _on_meta(model: str) -> ModelSpec:
    torch.manual_seed(0)
    with params_on_meta():
        return as_model_spec(load_model_spec(model))


def _real(model: str) -> ModelSpec:
    torch.manual_seed(0)
    return load_model_spec(model)


def test_meta_build_keeps_buffers_real_and_parameters_unallocated() -> None:
    spec = _on_meta("stagewise.zoo.hf:llama")
    ref = _real("stagewise.zoo.hf:llama")
    assert all(p.is_meta for p in spec.model.parameters())
    assert held_param_bytes(spec.model) == 0
    buffers = dict(spec.model.named_buffers())
    assert "model.rotary_emb.inv_freq" in buffers  # the rotary frequencies hold their true values, not garbage
    for name, ref_buffer in ref.model.named_buffers():
        assert not buffers[name].is_meta
        torch.testing.assert_close(buffers[name], ref_buffer, rtol=0, atol=0)


@pytest.mark.parametrize("model", MODELS)
def test_meta_capture_is_the_real_capture_and_runs_exactly_on_loaded_weights(model: str) -> None:
    ref, spec = _real(model), _on_meta(model)
    ref.model.eval()
    spec.model.eval()
    real = split(ref.model, ref.args, ref.kwargs, stages=3)
    meta = split(spec.model, spec.args, spec.kwargs, stages=3)
    assert [st.module.code for st in meta.stages] == [st.module.code for st in real.stages]
    assert meta.partition.to_dict() == real.partition.to_dict()
    state = dict(ref.model.named_parameters())
    for s in range(3):
        meta.materialise([s], read=lambda wanted, _aliases: {f: state[f].detach().clone() for f in wanted})
    want = flatten(real.run(ref.args, ref.kwargs))[0]
    got = flatten(meta.run(spec.args, spec.kwargs))[0]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("model", MODELS)
def test_seeded_init_is_the_same_in_every_layout(model: str) -> None:
    whole = _on_meta(model).model
    materialise(whole, [n for n, _ in whole.named_parameters()], seed=7)
    expected = whole.state_dict()
    got: dict[str, torch.Tensor] = {}
    for stages in (2, 3):
        for s in range(stages):
            spec = _on_meta(model)
            sm = split(spec.model, spec.args, spec.kwargs, stages=stages)
            sm.materialise([s], seed=7)
            assert held_param_bytes(spec.model) == sm.param_bytes([s]) > 0
            got.update({n: p.detach() for n, p in spec.model.named_parameters() if not p.is_meta})
    assert set(got) == {n for n, _ in whole.named_parameters()}
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    # Seeded, not constant: the weights look initialised (not zeros, not all equal), and another seed differs.
    linear = [v for n, v in got.items() if v.dim() == 2]
    assert all(float(v.std()) > 0 for v in linear)
    other = _on_meta(model).model
    materialise(other, [n for n, _ in other.named_parameters()], seed=8)
    assert any(not torch.equal(v, other.state_dict()[n]) for n, v in got.items() if v.dim() == 2)


def test_a_process_that_built_the_whole_model_keeps_only_its_stage() -> None:
    spec = _real("stagewise.zoo.hf:gpt2")
    sm = split(spec.model, spec.args, spec.kwargs, stages=3)
    total = held_param_bytes(spec.model)
    sm.keep_only([1])
    assert held_param_bytes(spec.model) == sm.param_bytes([1]) < total
    assert all(not p.is_meta for p in sm.stages[1].parameters())
    assert all(p.is_meta for p in sm.stages[0].parameters())



def test_bfloat16_weights_are_made_in_bfloat16() -> None:
    spec = _on_meta("stagewise.zoo.hf:llama")
    from stagewise.split import cast_meta_params

    cast_meta_params(spec.model, torch.bfloat16)
    sm = split(spec.model, spec.args, spec.kwargs, stages=2)
    sm.materialise([0, 1], seed=0)
    assert {p.dtype for p in spec.model.parameters()} == {torch.bfloat16}
    assert spec.model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their dtype
    out = sm.run(spec.args, spec.kwargs)
    assert torch.isfinite(out.loss)


def test_bfloat16_training_matches_its_single_process_reference() -> None:
    from stagewise.train import TrainConfig, Trainer, train_reference

    config = TrainConfig(model="stagewise.zoo.gpt:tiny_gpt", stages=2, microbatches=2, steps=2, global_batch=8,
                         progress=False, log_every=0, dropout=False, init="seeded", dtype="bfloat16", optimizer="sgd",
                         lr=0.05)
    result = Trainer(config).fit()
    losses, state = train_reference(config)
    # The first step is the same computation; after it, gradients summed per microbatch in bfloat16 round
    # differently from one whole-batch backward, so the comparison is at bfloat16's precision (8 bits of mantissa).
    assert result.losses[0] == losses[0]
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(losses), rtol=2e-2, atol=2e-2)
    trained = result.state_dict()
    assert {v.dtype for k, v in trained.items() if v.is_floating_point() and k in state} == {torch.bfloat16}
    for name, value in state.items():
        if name in trained:
            torch.testing.assert_close(trained[name].float(), value.float(), rtol=2e-2, atol=2e-2, msg=name)
