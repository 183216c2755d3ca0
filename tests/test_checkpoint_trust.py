"""A checkpoint is data: serving one never imports code its manifest names unless the user says so (issue #19.4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stagewise.checkpoint._format import canonical_checksum
from stagewise.serve._serving_split import checkpoint_model
from stagewise.train import TrainConfig, Trainer

SRC = Path(__file__).resolve().parent.parent / "src"


def _tamper(root: Path, model: str) -> None:
    """Point the manifest at ``model`` and recompute its checksum, as an attacker would."""
    (manifest_path,) = root.glob("step-*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["extra"]["config"]["model"] = model
    manifest.pop("checksum")
    manifest["checksum"] = canonical_checksum(manifest)
    manifest_path.write_text(json.dumps(manifest, indent=1))


def test_serving_a_checkpoint_does_not_run_the_code_its_manifest_names(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    Trainer(TrainConfig(model="stagewise.zoo.basic:mlp", stages=2, steps=1, global_batch=16, save_dir=str(root),
                        progress=False, log_every=0)).fit()
    assert checkpoint_model(str(root)) == "stagewise.zoo.basic:mlp"  # the library's own factory: no flag needed
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n\ndef factory():\n    raise SystemExit(0)\n")
    _tamper(root, f"{evil}:factory")

    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "stagewise.cli", "serve", str(root), "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert not marker.exists(), "the checkpoint's code ran"
    assert f"names its model '{evil}:factory'" in done.stderr
    assert f"stagewise serve {evil}:factory --checkpoint {root}" in done.stderr
    assert "--trust-checkpoint-code" in done.stderr
    # The user's explicit consent lets it through (the factory is then imported by the serving workers).
    assert checkpoint_model(str(root), trust_code=True) == f"{evil}:factory"
    assert not marker.exists()
    with pytest.raises(ValueError, match="name the model yourself"):
        checkpoint_model(str(root))
