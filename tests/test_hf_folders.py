"""Hugging Face folders (sharded safetensors) trained and served by stage, nobody building the whole model (#12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_weights import _gpt2, _llama, _weight_map

from stagewise.split import held_param_bytes, split
from stagewise.train import TrainConfig, Trainer, train_reference
from stagewise.train._rank import load_train_spec
from stagewise.weights import WeightsError, open_weights

tf = pytest.importorskip("transformers")
RTOL, ATOL = 1e-5, 4e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in (("llama", _llama()), ("gpt2", _gpt2())):
        model.save_pretrained(root / name, max_shard_size="20KB")
        assert len(set(_weight_map(root / name).values())) >= 3
        out[name] = root / name
    return out


def _pretrained(folder: Path) -> torch.nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_each_stage_reads_only_its_shards_and_the_stages_equal_from_pretrained(folders: dict[str, Path],
                                                                                name: str) -> None:
    folder = folders[name]
    config = TrainConfig(model=str(folder), stages=3, global_batch=4, microbatches=1)
    weight_map = _weight_map(folder)
    ids = torch.arange(24).reshape(2, 12) % 100
    stage_outputs = []
    for s in range(3):
        spec = load_train_spec(config)
        assert held_param_bytes(spec.model) == 0  # built on the meta device
        spec.model.eval()
        sm = split(spec.model, (), {"input_ids": ids}, stages=3)
        source = open_weights(folder)
        sm.materialise([s], read=lambda wanted, aliases: source.read(wanted, aliases=aliases))
        assert held_param_bytes(spec.model) == sm.param_bytes([s])
        owned = sm.partition.stages[s].params
        needed = {weight_map[f] for f in owned if f in weight_map}
        assert source.files_opened == needed, "a stage opened shard files it does not need"
        assert len(needed) < len(set(weight_map.values()))
        stage_outputs.append(sm)
    # Run stage by stage, each stage from its own process-like model: the outputs are from_pretrained's.
    recv: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    with torch.inference_mode():
        for s, sm in enumerate(stage_outputs):
            recv, outputs = sm.stages_for((), {"input_ids": ids})[1][s](recv, {"input_ids": ids})
        expected = _pretrained(folder)(input_ids=ids).logits
    logits = outputs[stage_outputs[-1].stages[2].spec.outputs.index("logits")]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_rotary_buffers_and_tied_embedding_are_right(folders: dict[str, Path]) -> None:
    llama = load_train_spec(TrainConfig(model=str(folders["llama"]), global_batch=4, microbatches=1)).model
    reference = _pretrained(folders["llama"])
    torch.testing.assert_close(llama.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq, rtol=0, atol=0)
    gpt2 = load_train_spec(TrainConfig(model=str(folders["gpt2"]), global_batch=4, microbatches=1))
    sm = split(gpt2.model, gpt2.args, gpt2.kwargs, stages=2)
    source = open_weights(folders["gpt2"])
    sm.materialise([0, 1], read=lambda wanted, aliases: source.read(wanted, aliases=aliases))
    assert gpt2.model.lm_head.weight is gpt2.model.transformer.wte.weight  # still tied after materialising
    torch.testing.assert_close(gpt2.model.lm_head.weight, _pretrained(folders["gpt2"]).lm_head.weight, rtol=0, atol=0)


@pytest.mark.parametrize("name,stages", [("llama", 2), ("gpt2", 3)])
def test_training_from_a_folder_matches_single_process(folders: dict[str, Path], name: str, stages: int) -> None:
    config = TrainConfig(model=str(folders[name]), stages=stages, microbatches=2, steps=2, global_batch=8,
                         progress=False, log_every=0, dropout=False)
    result = Trainer(config).fit()
    ref_losses, ref_state = train_reference(config)
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    state = result.state_dict()
    initial = _pretrained(folders[name]).state_dict()
    for fqn, value in ref_state.items():
        if fqn in state:
            torch.testing.assert_close(state[fqn], value, rtol=RTOL, atol=ATOL, msg=fqn)
    # The run started from the folder's weights: the first loss is from_pretrained's loss on the first batch.
    assert any(not torch.equal(state[f], initial[f]) for f in state if f in initial)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_serving_a_folder_equals_from_pretrained(folders: dict[str, Path], name: str) -> None:
    import httpx

    from stagewise.serve import GatewayConfig, PipelineBackend, create_app, serve_app

    folder = folders[name]
    backend = PipelineBackend(str(folder), stages=2, replicas=1, max_batch_size=2)
    try:
        backend.wait_ready(120)
        ids = torch.arange(32).reshape(2, 16) % 100
        body = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [2, 16],
                            "data": ids.reshape(-1).tolist()},
                           {"name": "attention_mask", "datatype": "INT64", "shape": [2, 16],
                            "data": [1] * 32}]}
        with serve_app(create_app(backend, config=GatewayConfig(close_backends=False))) as server:
            resp = httpx.post(f"{server.url}/v2/models/{folder.name}/infer", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        out = next(o for o in resp.json()["outputs"] if o["name"] == "logits")
        got = torch.tensor(out["data"]).reshape(out["shape"])
        with torch.inference_mode():
            expected = _pretrained(folder)(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        backend.shutdown()


def test_a_folder_missing_a_tensor_is_one_clear_error(folders: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    import shutil

    shutil.copytree(folders["llama"], folder)
    weight_map = _weight_map(folder)
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = folder / weight_map[victim]
    tensors = load_file(shard)
    del tensors[victim]
    save_file(tensors, shard, metadata={"format": "pt"})
    trainer = Trainer(TrainConfig(model=str(folder), stages=2, steps=1, global_batch=4, microbatches=1,
                                  progress=False, log_every=0))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as info:
        trainer.check()  # in this process, before any rank starts
    assert weight_map[victim] in str(info.value)
