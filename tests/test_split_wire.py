"""A stage pack as bytes (JSON + safetensors, nothing pickled): every zoo model's stages round-trip and compute the
same values; operators and classes outside the whitelist are refused on the way out and on the way in."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from stagewise import zoo
from stagewise.split import PackError, StagePack, input_leaves, run_stages, split
from stagewise.split._wire import MAGIC

MODELS = ["mlp", "tiny_gpt", "hf_llama", "hf_gpt2", "hf_bert", "hf_t5"]


@pytest.mark.parametrize("name", MODELS)
def test_zoo_stages_round_trip_and_compute_the_same(name: str) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    spec = zoo.get(name)()
    spec.model.eval()
    sm = split(spec.model, spec.args, spec.kwargs, stages=2)
    pack = sm.pack(range(2))
    data = pack.to_bytes()
    assert data.startswith(MAGIC) and b"pickle" not in data[:16]
    back = StagePack.from_bytes(data)
    assert back.partition == pack.partition
    assert back.output_names == pack.output_names
    assert back.out_spec == pack.out_spec  # the same classes (Hugging Face outputs, caches), keys and constants
    for i, st in pack.stages.items():
        got = back.stages[i]
        assert got.spec == st.spec and got.output_index == st.output_index
        assert got.module.code == st.module.code
        want_buffers = dict(st.module.named_buffers(remove_duplicate=False))
        got_buffers = dict(got.module.named_buffers(remove_duplicate=False))
        assert want_buffers.keys() == got_buffers.keys()
        for key, value in want_buffers.items():
            assert torch.equal(got_buffers[key], value), key  # rotary inv_freq and lifted constants hold real values
        assert set(got.module.state_dict()) == set(st.module.state_dict())  # non-persistent buffers stay so
        want = {n: (p.shape, p.dtype, p.is_meta) for n, p in st.module.named_parameters(remove_duplicate=False)}
        assert {n: (p.shape, p.dtype, p.is_meta) for n, p in got.module.named_parameters(remove_duplicate=False)} \
            == want
        assert len(list(got.module.parameters())) == len(list(st.module.parameters()))  # ties kept
    params = dict(spec.model.named_parameters())
    for p in (pack, back):
        p.fill({f: params[f] for f in p.param_names()})
    leaves, names, _ = input_leaves(spec.args, spec.kwargs)
    inputs = dict(zip(names, leaves))
    n_out = len(pack.output_names)
    with torch.no_grad():
        expected = run_stages([sm.stages[i] for i in range(2)], inputs, outputs=n_out)
        for p in (pack, back):
            got_out = run_stages([p.stages[i] for i in range(2)], inputs, outputs=n_out)
            for e, g in zip(expected, got_out):
                if isinstance(e, torch.Tensor):
                    assert torch.equal(e, g)


def _mlp_pack() -> StagePack:
    spec = zoo.get("mlp")()
    return split(spec.model, spec.args, spec.kwargs, stages=2).pack([0])


def test_a_target_off_the_whitelist_is_refused_on_the_way_out() -> None:
    pack = _mlp_pack()
    graph = pack.stages[0].module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        graph.call_function(os.getpid)
    with pytest.raises(PackError, match=r"stage 0, node getpid calls posix\.getpid, which cannot travel as data"):
        pack.to_bytes()


def _edit_header(data: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    start = len(MAGIC) + 8
    (n,) = struct.unpack_from("<Q", data, len(MAGIC))
    header = json.loads(data[start:start + n])
    edit(header)
    head = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + data[start + n:]


def test_a_target_or_class_off_the_whitelist_is_refused_on_the_way_in() -> None:
    pack = _mlp_pack()
    data = pack.to_bytes()

    def call_system(header: dict) -> None:  # type: ignore[type-arg]
        node = next(n for n in header["stages"]["0"]["nodes"] if n[0] == "call_function")
        node[2] = {"fn": "os.system"}

    with pytest.raises(PackError, match="calls fn 'os.system', which is not on the whitelist"):
        StagePack.from_bytes(_edit_header(data, call_system))

    def name_popen(header: dict) -> None:  # type: ignore[type-arg]
        header["out_spec"] = {"kind": "seq", "type": "subprocess.Popen", "keys": [], "children": [], "value": None}

    with pytest.raises(PackError, match="names the class 'subprocess.Popen', which a stage pack may not name"):
        StagePack.from_bytes(_edit_header(data, name_popen))
    with pytest.raises(PackError, match="stage pack is malformed: KeyError"):
        StagePack.from_bytes(_edit_header(data, lambda header: header.pop("out_spec")))
    with pytest.raises(PackError, match="not a Stagewise stage pack"):
        StagePack.from_bytes(b"\x80\x04" + data)
    assert b'"op": "aten::' in data  # operators travel by qualified name
