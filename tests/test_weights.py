"""Weights read per stage from the files users keep: Hugging Face folders (sharded), single files, checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from stagewise._spec import load_model_spec, training_data
from stagewise.checkpoint import CheckpointWriter, tied_groups
from stagewise.weights import WeightsError, hf_folder_spec, is_hf_folder, open_weights

tf = pytest.importorskip("transformers")

GPT2_TIED = {"lm_head.weight": ["transformer.wte.weight"]}


def _llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    config = tf.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=128, head_dim=16, max_position_embeddings=64,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).to(dtype)


def _gpt2() -> nn.Module:
    config = tf.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=128, n_positions=64, bos_token_id=127,
                           eos_token_id=127)
    torch.manual_seed(1)
    return tf.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in (("llama", _llama()), ("gpt2", _gpt2()), ("llama_bf16", _llama(torch.bfloat16))):
        model.save_pretrained(root / name, max_shard_size="20KB")
        out[name] = root / name
    return out


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _reference(folder: Path, **kw: object) -> nn.Module:
    return tf.AutoModelForCausalLM.from_pretrained(folder, **kw)


def test_folders_are_sharded(folders: dict[str, Path]) -> None:
    for name in ("llama", "gpt2"):
        shards = sorted(p.name for p in folders[name].glob("model-*.safetensors"))
        assert len(shards) >= 3, (name, shards)
        assert set(_weight_map(folders[name]).values()) == set(shards)
        assert is_hf_folder(folders[name])


def test_one_layer_opens_only_its_shards(folders: dict[str, Path]) -> None:
    folder = folders["llama"]
    sd = _reference(folder).state_dict()
    layer = {k: v for k, v in sd.items() if k.startswith("model.layers.2.")}
    expected_files = {_weight_map(folder)[k] for k in layer}
    assert 0 < len(expected_files) < len(set(_weight_map(folder).values()))
    source = open_weights(folder)
    assert source.files_opened == set()  # opening reads only the index
    got = source.read({k: v.to("meta") for k, v in layer.items()})
    assert source.files_opened == expected_files
    assert got.keys() == layer.keys()
    for k, v in layer.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_reading_everything_reproduces_from_pretrained(folders: dict[str, Path], name: str) -> None:
    model = _reference(folders[name])
    sd = model.state_dict()
    aliases = GPT2_TIED if name == "gpt2" else {}
    source = open_weights(folders[name])
    source.check_covers(sd, aliases=aliases)
    got = source.read({k: v.to("meta") for k, v in sd.items()}, aliases=aliases)
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    if name == "gpt2":
        assert "lm_head.weight" not in source.keys()  # saved once, under the embedding's name
        with pytest.raises(WeightsError, match="lm_head.weight"):
            source.check_covers(sd)
    else:  # the rotary buffer is not persistent: not in the file, and not asked for
        assert "model.rotary_emb.inv_freq" in dict(model.named_buffers())
        assert not any("inv_freq" in k for k in source.keys())


class _DtypesMade(TorchDispatchMode):
    """Records the dtype of every tensor an operator makes."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.dtypes.add(t.dtype)
        return out


def test_bf16_read_as_bf16_without_float32(folders: dict[str, Path]) -> None:
    folder = folders["llama_bf16"]
    sd = _reference(folder, dtype=torch.bfloat16).state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    mode = _DtypesMade()
    with mode:
        got = open_weights(folder).read({k: (tuple(v.shape), torch.float32) for k, v in sd.items()},
                                        dtype=torch.bfloat16)
    assert torch.float32 not in mode.dtypes
    for k, v in sd.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k
    # without dtype=, the model's dtype wins: bf16 files into a float32 model
    widened = open_weights(folder).read({k: (tuple(v.shape), torch.float32) for k, v in sd.items()})
    for k, v in sd.items():
        assert widened[k].dtype == torch.float32 and torch.equal(widened[k], v.float()), k


def test_dtype_conversion_on_request(folders: dict[str, Path]) -> None:
    sd = _reference(folders["llama"]).state_dict()
    got = open_weights(folders["llama"]).read(sd, dtype=torch.float16)
    for k, v in sd.items():
        assert got[k].dtype == torch.float16 and torch.equal(got[k], v.half()), k


def test_tensor_missing_from_its_shard(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(folders["llama"], folder)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = folder / _weight_map(folder)[name]
    kept = {k: v for k, v in load_file(shard).items() if k != name}
    save_file(kept, shard, metadata={"format": "pt"})
    sd = _reference(folders["llama"]).state_dict()
    with pytest.raises(WeightsError) as exc:
        open_weights(folder).read({k: v.to("meta") for k, v in sd.items()})
    msg = str(exc.value)
    assert name in msg and shard.name in msg and "[64, 32]" in msg and "1 of 39" in msg
    # a stage that does not need it reads its part
    other = {k: v for k, v in sd.items() if k.startswith("model.layers.3.")}
    assert open_weights(folder).read(other).keys() == other.keys()


def test_shape_and_kind_mismatches(folders: dict[str, Path]) -> None:
    source = open_weights(folders["llama"])
    with pytest.raises(WeightsError) as exc:
        source.read({"model.norm.weight": ((64,), torch.float32),
                     "model.embed_tokens.weight": ((128, 32), torch.int64),
                     "model.layers.9.self_attn.q_proj.weight": ((32, 32), torch.float32)})
    msg = str(exc.value)
    assert "model.norm.weight: expected shape [64], found [32]" in msg
    assert "model.embed_tokens.weight: expected torch.int64 (int), found F32 (float)" in msg
    assert "model.layers.9.self_attn.q_proj.weight" in msg and "not in the files" in msg
    assert "model.safetensors.index.json" in msg


def _small() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_plain_safetensors_and_state_dict_files(tmp_path: Path) -> None:
    model = _small()
    sd = model.state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        source = open_weights(tmp_path / name)
        assert source.keys() == set(sd)
        got = source.read({k: v.to("meta") for k, v in sd.items() if k.startswith("2.")})
        assert source.files_opened == {name}
        assert got.keys() == {"2.weight", "2.bias"}
        assert all(torch.equal(got[k], sd[k]) for k in got)


def test_state_dict_file_that_is_not_one(tmp_path: Path) -> None:
    torch.save({"model": _small().state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match=r"ckpt.pt: holds a dict with keys model, step, not a flat"):
        open_weights(tmp_path / "ckpt.pt")


def test_stagewise_checkpoint_directory(tmp_path: Path) -> None:
    from stagewise.zoo.gpt import tiny_gpt

    model = tiny_gpt().model
    sd = model.state_dict()
    first = {k: v for k, v in sd.items() if k.startswith(("wte.", "wpe.", "blocks.0.", "blocks.1."))}
    second = {k: v for k, v in sd.items() if k not in first and k != "lm_head.weight"}
    writer = CheckpointWriter(tmp_path)
    writer.save_part(1, part="stage0", tensors=first)
    writer.save_part(1, part="stage1", tensors=second)
    writer.commit(1, parts=["stage0", "stage1"], tied=tied_groups(model))
    source = open_weights(tmp_path)  # the root: its latest checkpoint
    last = {k: v.to("meta") for k, v in sd.items() if k.startswith(("blocks.3.", "ln_f.", "lm_head."))}
    got = source.read(last)  # lm_head.weight: tied to wte.weight by the manifest, saved in stage0
    assert source.files_opened == {"stage0.model.safetensors", "stage1.model.safetensors"}
    assert all(torch.equal(got[k], sd[k]) for k in last)
    source.check_covers(sd)
    mid = open_weights(tmp_path / "step-00000001")
    mid.read({k: v for k, v in sd.items() if k.startswith("blocks.3.")})
    assert mid.files_opened == {"stage1.model.safetensors"}
    mid.check_opened_only([k for k in sd if k.startswith("blocks.3.")])  # what the workers check after reading
    assert mid.files_holding(["wte.weight", "blocks.3.ln_1.weight"]) == {"stage0.model.safetensors",
                                                                       "stage1.model.safetensors"}
    with pytest.raises(RuntimeError, match=r"opened weight files that hold none of its tensors: \['stage1"):
        mid.check_opened_only(["wte.weight"], who="stage 0's worker")


def test_legacy_and_prefix_differences(tmp_path: Path) -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = _small()

    model = Wrapped()
    sd = model.state_dict()
    legacy = {k.removeprefix("transformer.").replace("1.weight", "1.gamma").replace("1.bias", "1.beta"): v
              for k, v in sd.items()}
    assert "1.gamma" in legacy and "1.beta" in legacy
    save_file(legacy, tmp_path / "bare.safetensors")
    source = open_weights(tmp_path / "bare.safetensors")
    assert source.keys() == {k.removeprefix("transformer.") for k in sd}
    got = source.read(sd)  # the file lacks the model's base prefix and names LayerNorm gamma/beta
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    bare = _small().state_dict()  # the other way round: the file has a prefix the model lacks
    prefixed = {f"bert.{k}": torch.randn_like(v) for k, v in bare.items()}
    save_file(prefixed, tmp_path / "prefixed.safetensors")
    got = open_weights(tmp_path / "prefixed.safetensors").read(bare)
    assert all(torch.equal(got[k], prefixed[f"bert.{k}"]) for k in bare)


def test_paths_of_no_accepted_kind(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match="Hugging Face model folder"):
        open_weights(tmp_path / "notes.txt")
    with pytest.raises(WeightsError, match=r"neither a Stagewise checkpoint nor Hugging Face weights \(it has: "
                                           r"notes.txt\)"):
        open_weights(tmp_path)
    with pytest.raises(WeightsError, match="does not exist"):
        open_weights(tmp_path / "nowhere")
    assert not is_hf_folder(tmp_path)


def test_hf_folder_as_model(folders: dict[str, Path]) -> None:
    folder = folders["llama"]
    spec = load_model_spec(str(folder))
    assert spec.name == "llama" and spec.loss is None
    assert type(spec.model).__name__ == "LlamaForCausalLM"
    ids = spec.kwargs["input_ids"]
    assert ids.shape == (4, 16) and int(ids.max()) < 128
    out = spec.model(**spec.kwargs)
    assert out.logits.shape == (4, 16, 128)
    data = training_data(spec)
    assert len(data) == 256
    inputs, targets = data[0]
    assert targets == () and torch.equal(inputs["labels"], inputs["input_ids"])
    batch = {k: torch.stack([data[i][0][k] for i in range(3)]) for k in inputs}
    loss = spec.model(**batch).loss
    assert loss.ndim == 0 and torch.isfinite(loss)
    # the same random weights in every process that builds it
    again = hf_folder_spec(folder)
    assert all(torch.equal(a, b) for a, b in zip(spec.model.state_dict().values(), again.model.state_dict().values()))
