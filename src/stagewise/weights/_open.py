"""``open_weights``: which files a path means and which file holds each tensor (from an index, a manifest or the
files' own headers), without reading any tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._checkpoint_layout import FORMAT, MANIFEST, latest_checkpoint
from ._errors import WeightsError, first_few
from ._files import file_keys
from ._source import WeightSource

__all__ = ["ACCEPTED", "HF_WEIGHT_FILES", "is_hf_folder", "open_weights"]

HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")
"""A Hugging Face folder's weights, in the order ``from_pretrained`` prefers them."""
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin")
ACCEPTED = ("give a Stagewise checkpoint directory (or the directory holding its step-* checkpoints), a Hugging Face "
            f"model folder (config.json with {', '.join(HF_WEIGHT_FILES)}), a .safetensors file, an *.index.json "
            "file of shards, or a state_dict file saved by torch.save (.pt, .pth, .bin)")


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder: a directory with ``config.json`` and weights files."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in HF_WEIGHT_FILES)


def open_weights(path: str | Path) -> WeightSource:
    """The weights at ``path`` (see the package docstring for what it may be), ready to :meth:`~WeightSource.read`.

    Reads only an index, a manifest or the headers; raises :class:`WeightsError` for a path of no accepted kind.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path} does not exist; {ACCEPTED}")
    if path.is_dir():
        step_dir = path if (path / MANIFEST).is_file() else latest_checkpoint(path)
        if step_dir is not None:
            return _checkpoint(path, step_dir)
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return _file(path, path / name)
        found = sorted(p.name for p in path.iterdir())
        raise WeightsError(f"{path} is a directory holding neither a Stagewise checkpoint nor Hugging Face weights "
                           f"(it has: {first_few(found) or 'nothing'}); {ACCEPTED}")
    if path.suffix == ".safetensors" or path.suffix in STATE_DICT_SUFFIXES or path.name.endswith(".index.json"):
        return _file(path, path)
    raise WeightsError(f"{path} is not a weights file this reader knows; {ACCEPTED}")


def _file(given: Path, path: Path) -> WeightSource:
    """One weights file, or the shards an ``*.index.json`` lists."""
    if not path.name.endswith(".index.json"):
        return WeightSource(given, dict.fromkeys(file_keys(path), path.name), folder=path.parent)
    weight_map = _json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{path}: no \"weight_map\" of tensor name -> shard file; is it a sharded-weights index?")
    return WeightSource(given, weight_map, folder=path.parent, listed_in=path.name)


def _checkpoint(given: Path, step_dir: Path) -> WeightSource:
    """A Stagewise checkpoint: each part's model file holds its tensors by FQN; tied groups are saved once."""
    manifest = _json(step_dir / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise WeightsError(f"{step_dir / MANIFEST}: not a Stagewise checkpoint manifest (no \"format\": "
                           f"\"{FORMAT}\"); {ACCEPTED}")
    where: dict[str, str] = {}
    for part in sorted(manifest["parts"]):
        rec = manifest["parts"][part]
        for fqn in rec["tensors"]:
            where.setdefault(fqn, rec["model"])
    sizes = {name: int(rec["size"]) for name, rec in manifest.get("files", {}).items()}
    return WeightSource(given, where, folder=step_dir, listed_in=MANIFEST, tied=manifest.get("tied", []),
                        sizes=sizes)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data
