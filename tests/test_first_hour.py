"""A new user's first hour (issue 13), reproduced as they met it: their own model file, the CLI as a subprocess."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from pathlib import Path

import pytest
import torch
from cli_run import cli_env, free_port, run_ok, serving

USER_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))


    def tiny():
        torch.manual_seed(0)
        return Net(), (torch.randn(2, 4),)
''')


def _post(port: int, model: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.timeout(600)
def test_inputs_are_served_by_forward_parameter_names(tmp_path: Path) -> None:
    """Item 4: ``forward(self, x)`` serves input ``x`` (``-i x=...`` works); ``arg0`` is still accepted."""
    env = cli_env(tmp_path)
    (tmp_path / "my_model.py").write_text(USER_MODEL)
    port = free_port()
    with serving(f"stagewise serve my_model.py:tiny --stages 2 --port {port}", port, tmp_path, env):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/tiny", timeout=30) as r:
            meta = json.loads(r.read())
        assert [t["name"] for t in meta["inputs"]] == ["x"]
        out = run_ok(f"stagewise infer http://127.0.0.1:{port} tiny -i 'x=[[1,2,3,4]]' --json", tmp_path, env)
        by_name = json.loads(out.stdout)["outputs"][0]["data"]
        row = {"datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
        by_position = _post(port, "tiny", {"inputs": [{"name": "arg0", **row}]})["outputs"][0]["data"]
        assert len(by_name) == 2 and by_name == by_position


USER_TRAINABLE = USER_MODEL.replace("def tiny():", "def _unused():") + textwrap.dedent('''

    import torch.nn.functional as F
    import stagewise


    def tiny():
        torch.manual_seed(0)
        X = torch.randn(64, 4)
        Y = X @ torch.randn(4, 2)
        return stagewise.ModelSpec(model=Net(), args=(X[:2],), loss=F.mse_loss,
                                   dataset=lambda: [(X[i], (Y[i],)) for i in range(64)], name="tiny")
''')


@pytest.mark.timeout(600)
def test_checkpoint_serves_from_another_directory(tmp_path: Path) -> None:
    """Item 3: a checkpoint of ``my_model.py:tiny`` trained in one directory serves from another (the manifest
    records where the factory file is), and is queried by input name."""
    env = cli_env(tmp_path)
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "my_model.py").write_text(USER_TRAINABLE)
    run_ok("stagewise train my_model.py:tiny --stages 2 --steps 2 --global-batch 8 --save ckpt", project, env)
    port = free_port()
    cmd = f"stagewise serve {project / 'ckpt'} --trust-checkpoint-code --port {port}"
    with serving(cmd, port, elsewhere, env) as log:
        out = run_ok(f"stagewise infer http://127.0.0.1:{port} tiny -i 'x=[[1,2,3,4]]' --json", elsewhere, env)
        said = log.read_text()
    assert len(json.loads(out.stdout)["outputs"][0]["data"]) == 2
    # Say where the model came from: the manifest's absolute factory path.
    assert f"model {project / 'my_model.py'}:tiny (from the manifest of checkpoint {project / 'ckpt'})" in said, said


@pytest.mark.timeout(600)
def test_checkpoint_of_a_tied_model_says_so_and_exports_for_a_strict_load(tmp_path: Path) -> None:
    """Item 3: ``checkpoint info`` names GPT's tied embedding / LM head; ``export`` without ``--model`` writes a file
    that ``load_state_dict(strict=True)`` accepts (every name of a tied weight)."""
    from safetensors.torch import load_file

    from stagewise.zoo.gpt import tiny_gpt

    env = cli_env(tmp_path)
    run_ok("stagewise train stagewise.zoo.gpt:tiny_gpt --stages 2 --steps 1 --save ckpt", tmp_path, env)
    info = run_ok("stagewise checkpoint info ckpt", tmp_path, env).stdout
    assert "tied: lm_head.weight = wte.weight" in info or "tied: wte.weight = lm_head.weight" in info, info
    run_ok("stagewise checkpoint export ckpt --out gpt.safetensors", tmp_path, env)
    model = tiny_gpt().model
    model.load_state_dict(load_file(tmp_path / "gpt.safetensors"), strict=True)


NESTED_MODEL = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 8)
            self.stages = nn.ModuleList([Block() for _ in range(3)])
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
            return self.head(x)


    def net():
        torch.manual_seed(0)
        return Net(), (torch.randn(2, 4),)
''')


def test_cut_at_a_container_module_means_before_its_first_unit(tmp_path: Path) -> None:
    """Item 5: ``--cuts stages.2`` (a container of units, like ``convnext.encoder.stages.2``) cuts before
    ``stages.2.layers.0``, on the command line and in Python, where one string is one cut (or a comma list)."""
    import stagewise

    env = cli_env(tmp_path)
    (tmp_path / "my_net.py").write_text(NESTED_MODEL)
    run_ok("stagewise split my_net.py:net --cuts stages.2 --json p.json", tmp_path, env)
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["stages"][1]["units"][0] == "stages.2.layers.0", doc["stages"][1]["units"]

    namespace: dict = {}
    exec(compile(NESTED_MODEL, "my_net.py", "exec"), namespace)  # the user's file, in this process
    model, args = namespace["net"]()
    one = stagewise.split(model, args, cuts="stages.2")
    assert [st.units[0] for st in one.partition.stages] == ["stem", "stages.2.layers.0"]
    two = stagewise.split(model, args, cuts="stages.1, stages.2.layers.1")
    assert [st.units[0] for st in two.partition.stages] == ["stem", "stages.1.layers.0", "stages.2.layers.1"]
    assert torch.equal(two(*args), model(*args))


def test_positional_aliases_resolve_once() -> None:
    """Item 4: a request may give ``x`` as ``arg0``, but not both; an alias must name an input and not shadow one."""
    from stagewise.serve import BadRequestError, ModelMetadata, TensorMetadata, parse_infer_request, validate_inputs

    meta = ModelMetadata(name="tiny", inputs=(TensorMetadata(name="x", datatype="FP32", shape=(-1, 4)),),
                         outputs=(TensorMetadata(name="output", datatype="FP32", shape=(-1, 2)),),
                         aliases={"arg0": "x"})
    row = {"datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}

    def request(*names: str) -> bytes:
        return json.dumps({"inputs": [{"name": n, **row} for n in names]}).encode()

    assert list(validate_inputs(parse_infer_request(request("arg0"), None), meta)) == ["x"]
    with pytest.raises(BadRequestError, match="'x' is given twice"):
        validate_inputs(parse_infer_request(request("x", "arg0"), None), meta)
    with pytest.raises(ValueError, match="aliases"):
        ModelMetadata(name="m", inputs=meta.inputs, outputs=meta.outputs, aliases={"x": "x"})
