"""Leaving Stagewise: one safetensors file for ``model.load_state_dict(strict=True)``, a Hugging Face directory for
``from_pretrained``, and the table ``stagewise checkpoint info`` prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch import nn

from ._format import fsync_dir
from ._load import Checkpoint
from ._state import tied_groups
from ._write import write_safetensors

__all__ = ["export_pretrained", "export_state_dict", "export_tensors", "format_info"]


def export_tensors(checkpoint: Checkpoint, *, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Every model tensor by FQN, with a tied weight under each of its names.

    The tied names come from ``model`` when given (its ``state_dict()`` is the target: a key the checkpoint cannot
    fill, or a saved tensor the model does not have, raises ``ValueError``), else from the manifest's ``tied``.
    """
    tensors = checkpoint.tensors()
    groups = tied_groups(model) if model is not None else checkpoint.tied
    for group in groups:
        source = next((name for name in group if name in tensors), None)
        if source is not None:
            for name in group:
                tensors.setdefault(name, tensors[source])
    if model is not None:
        expected = model.state_dict()
        missing = [k for k in expected if k not in tensors]
        unexpected = [k for k in tensors if k not in expected]
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint.path} does not fit {type(model).__name__}: missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; is --model the model that "
                             "was trained?")
        bad = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
               if tuple(tensors[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"checkpoint {checkpoint.path} has other shapes than {type(model).__name__}: {bad[:5]}")
        tensors = {k: tensors[k] for k in expected}  # the model's own order
    return tensors


def export_state_dict(checkpoint: Checkpoint, out_path: str | Path, *, model: nn.Module | None = None) -> Path:
    """Write every model tensor of ``checkpoint`` to one safetensors file keyed by the original FQNs.

    Tied weights are written under every name (see :func:`export_tensors`), so ``model.load_state_dict(
    safetensors.torch.load_file(out_path), strict=True)`` works on the original model class.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(checkpoint, model=model)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        write_safetensors(tmp, tensors, metadata={"format": "pt", "stagewise_step": str(checkpoint.step)})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(out.parent)
    return out


def export_pretrained(checkpoint: Checkpoint, model: nn.Module, out_dir: str | Path) -> Path:
    """Load the checkpoint into a Hugging Face ``model`` (strictly) and ``save_pretrained(out_dir)`` it.

    ``from_pretrained(out_dir)`` then loads the trained weights (safetensors; nothing is downloaded).
    """
    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise ValueError(f"{type(model).__name__} has no save_pretrained; it is not a Hugging Face model "
                         "(use export_state_dict instead)")
    model.load_state_dict(export_tensors(checkpoint, model=model), strict=True)
    out = Path(out_dir)
    save(str(out))
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_info(checkpoint: Checkpoint) -> Table:
    """A rich table of the checkpoint: one row per part (tensors, parameters, bytes, optimizer, extras)."""
    m = checkpoint.manifest
    table = Table(title=f"{checkpoint.path} (step {checkpoint.step})", title_justify="left")
    for col, justify in (("part", "left"), ("tensors", "right"), ("elements", "right"), ("model", "right"),
                         ("optimizer", "left"), ("optim", "right"), ("extra keys", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    total_elems = 0
    for part in checkpoint.parts:
        rec = m["parts"][part]
        elems = sum(_numel(d["shape"]) for d in rec["tensors"].values())
        total_elems += elems
        opt = rec.get("optimizer")
        opt_desc = "-"
        if opt:
            meta: dict[str, Any] = opt["meta"]
            names = sorted({k.rpartition("::")[2] for k in opt["tensors"]})
            opt_desc = f"{meta.get('optimizer', '?')} ({', '.join(names)})" if names else str(meta.get("optimizer"))
        optim_size = _human(m["files"][rec["optim"]]["size"]) if rec.get("optim") else "-"
        table.add_row(part, str(len(rec["tensors"])), f"{elems:,}", _human(m["files"][rec["model"]]["size"]),
                      opt_desc, optim_size, ", ".join(sorted(rec.get("extra", {}))) or "-")
    partition = m.get("partition")
    stages = len(partition.get("stages", [])) if isinstance(partition, dict) else None
    lines = [
        f"format {m['format']} v{m['version']}, created {m.get('created', '?')}, {len(m['files'])} files, "
        f"{_human(checkpoint.nbytes)}, {total_elems:,} elements",
        f"partition: {'none recorded' if partition is None else f'{stages} stages' if stages else 'recorded'}; "
        f"tied: {'; '.join(' = '.join(g) for g in checkpoint.tied) or 'none'}",
        f"run extras: {', '.join(sorted(checkpoint.extra)) or 'none'}",
    ]
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
