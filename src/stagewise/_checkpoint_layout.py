"""Where a Stagewise checkpoint lives on disk: the step directories, their manifest, the ``latest`` pointer.

Shared by ``checkpoint`` (which writes, verifies and reads checkpoints) and ``weights`` (which reads a checkpoint's
tensors per stage, like any other weights files); imports nothing of ours, so both layers may use it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

__all__ = ["FORMAT", "LATEST", "MANIFEST", "STEP_RE", "TMP_RE", "VERSION", "latest_checkpoint", "list_checkpoints",
           "step_name"]

log = logging.getLogger(__name__)

FORMAT = "stagewise-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d{8,})$")
TMP_RE = re.compile(r"^step-(\d{8,})\.tmp$")


def step_name(step: int) -> str:
    """``step-00000042``: the directory of the checkpoint taken after optimizer step ``step``."""
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, dir)``, oldest first (an unfinished ``.tmp`` is not one)."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if m and (d / MANIFEST).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory the ``latest`` pointer names, else the newest complete checkpoint, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if STEP_RE.match(name) and (root / name / MANIFEST).is_file():
            return root / name
        log.warning("%s names %r, which is not a complete checkpoint; using the newest one instead", pointer, name)
    found = list_checkpoints(root)
    return found[-1][1] if found else None
