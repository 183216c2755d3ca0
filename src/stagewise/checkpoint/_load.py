"""``load_checkpoint``: find, verify and read a checkpoint, by FQN, whatever layout wrote it.

A reader asks for the FQNs it needs (a stage of a new layout asks for its own) and gets them from whichever part
files hold them, so any (stages x replicas) layout loads what any other saved. Every file is checked against the
manifest (size always; sha256 of every file at open by default, or of each file as it is read), and the manifest
checks itself with a checksum over its own canonical JSON.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ._format import (
    FORMAT,
    MANIFEST,
    STEP_RE,
    TMP_RE,
    VERSION,
    CheckpointError,
    canonical_checksum,
    latest_checkpoint,
    read_tensors,
    sha256_file,
)

__all__ = ["Checkpoint", "Verify", "load_checkpoint"]

log = logging.getLogger(__name__)

Verify = Literal["all", "read", "size"]
"""``all``: hash every file when the checkpoint is opened; ``read``: hash each file (once) as tensors are read from
it, in the same pass; ``size``: check sizes only."""
MAX_READERS = 4


def load_checkpoint(path: str | Path, *, verify: Verify = "all") -> Checkpoint:
    """Open the checkpoint at ``path``: a step directory, or a root (then the one ``latest`` names).

    Raises :class:`CheckpointError` when there is none, or when a file is missing, truncated or altered (the message
    names the file and the sha256 the manifest expects).
    """
    if verify not in ("all", "read", "size"):
        raise ValueError(f"verify must be 'all', 'read' or 'size', got {verify!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / MANIFEST).is_file():
        step_dir = path
    elif STEP_RE.match(path.name) or TMP_RE.match(path.name):
        raise CheckpointError(f"{path / MANIFEST} is missing: {path} is not a complete checkpoint")
    elif path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            unfinished = sorted(p.name for p in path.glob("step-*.tmp"))
            hint = f" (only unfinished ones: {', '.join(unfinished)})" if unfinished else ""
            raise CheckpointError(f"no complete checkpoint in {path}{hint}")
        step_dir = found
    else:
        raise CheckpointError(f"{path} is a file; give a checkpoint directory or the directory holding them")
    ckpt = Checkpoint(step_dir, _read_manifest(step_dir / MANIFEST), verify=verify)
    if verify == "all":
        ckpt.verify()
    return ckpt


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the manifest is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a Stagewise checkpoint manifest (no \"format\": \"{FORMAT}\")")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')!r} is newer than this Stagewise "
                              f"reads ({VERSION}); upgrade Stagewise")
    recorded = manifest.pop("checksum", None)
    actual = canonical_checksum(manifest)
    if recorded != actual:
        raise CheckpointError(f"{path}: the manifest's contents hash to {actual} but it records checksum {recorded}; "
                              "the manifest was altered or is damaged")
    manifest["checksum"] = recorded
    return manifest


class Checkpoint:
    """One committed checkpoint: its manifest, and its tensors and optimizer state by FQN."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, verify: Verify = "all") -> None:
        self.path = path
        self.manifest = manifest
        self._verify_mode = verify
        self._verified: set[str] = set()
        self._lock = threading.Lock()
        self._model: dict[str, tuple[str, str]] = {}  # fqn -> (file, key in file)
        self._optim: dict[str, dict[str, tuple[str, str]]] = {}  # fqn -> {state name -> (file, key)}
        for part in sorted(manifest["parts"]):
            rec = manifest["parts"][part]
            for fqn in rec["tensors"]:
                self._model.setdefault(fqn, (rec["model"], fqn))
            if rec.get("optimizer"):
                for key in rec["optimizer"]["tensors"]:
                    fqn, _, name = key.rpartition("::")
                    self._optim.setdefault(fqn, {}).setdefault(name, (rec["optim"], key))
        self._check_sizes()

    # --- what the manifest says ---------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """The optimizer step this checkpoint was taken after."""
        return int(self.manifest["step"])

    @property
    def parts(self) -> list[str]:
        """The parts (e.g. ``stage0``...) that wrote this checkpoint."""
        return sorted(self.manifest["parts"])

    @property
    def partition(self) -> dict[str, Any] | None:
        """The partition/plan JSON the run was saved with, if the writer gave one."""
        return self.manifest.get("partition")

    @property
    def tied(self) -> list[list[str]]:
        """Groups of FQNs that share one tensor in the original model (saved once, under one of the names)."""
        return [list(g) for g in self.manifest.get("tied", [])]

    @property
    def extra(self) -> dict[str, Any]:
        """The run-wide JSON given to ``commit(manifest_extra=...)``."""
        return dict(self.manifest.get("extra", {}))

    def part_extra(self, part: str) -> dict[str, Any]:
        """The per-part JSON given to ``save_part(extra_json=...)``."""
        if part not in self.manifest["parts"]:
            raise CheckpointError(f"no part {part!r} in {self.path}; it has {self.parts}")
        return dict(self.manifest["parts"][part].get("extra", {}))

    @property
    def nbytes(self) -> int:
        """Total size of the tensor files."""
        return sum(int(f["size"]) for f in self.manifest["files"].values())

    def fqns(self) -> list[str]:
        """Every saved model tensor's FQN (a tied weight appears once, under the name its owner saved)."""
        return list(self._model)

    # --- verification -------------------------------------------------------------------------------------------

    def _check_sizes(self) -> None:
        for name, rec in self.manifest["files"].items():
            p = self.path / name
            if not p.is_file():
                raise CheckpointError(f"{p} is missing; the manifest expects it ({rec['size']} bytes, "
                                      f"sha256 {rec['sha256']})")
            size = p.stat().st_size
            if size != rec["size"]:
                raise CheckpointError(f"{p} has {size} bytes but the manifest expects {rec['size']} (sha256 "
                                      f"{rec['sha256']}); the file was truncated or altered")

    def verify(self) -> None:
        """Hash every file not yet verified and compare with the manifest (files in parallel)."""
        todo = [n for n in self.manifest["files"] if n not in self._verified]
        if not todo:
            return
        with concurrent.futures.ThreadPoolExecutor(min(len(todo), MAX_READERS)) as pool:
            digests = dict(zip(todo, pool.map(lambda n: sha256_file(self.path / n), todo)))
        for name in todo:
            expected = self.manifest["files"][name]["sha256"]
            if digests[name] != expected:
                raise CheckpointError(f"{self.path / name}: sha256 is {digests[name]}, the manifest expects "
                                      f"{expected}; the file was altered or is corrupt")
        with self._lock:
            self._verified.update(todo)

    # --- reading ------------------------------------------------------------------------------------------------

    def _resolve(self, fqn: str, table: Mapping[str, Any]) -> str | None:
        """The saved name holding ``fqn``: itself, or a tied alias of it."""
        if fqn in table:
            return fqn
        for group in self.tied:
            if fqn in group:
                for other in group:
                    if other in table:
                        return other
        return None

    def _saved_names(self, fqns: Iterable[str] | None) -> dict[str, str]:
        if fqns is None:
            return {f: f for f in self._model}
        out = {}
        for fqn in fqns:
            saved = self._resolve(fqn, self._model)
            if saved is None:
                sample = ", ".join(list(self._model)[:3])
                raise CheckpointError(f"{fqn!r} is not in checkpoint {self.path} (it holds {len(self._model)} "
                                      f"tensors: {sample}, ...); is it a checkpoint of this model?")
            out[fqn] = saved
        return out

    def _read(self, wanted: Mapping[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
        """``{name: (file, key)}`` -> ``{name: tensor}``, reading files in parallel, hashing per the verify mode."""
        by_file: dict[str, set[str]] = {}
        for file, key in wanted.values():
            by_file.setdefault(file, set()).add(key)

        def one(file: str) -> dict[str, torch.Tensor]:
            expect = None
            if self._verify_mode == "read" and file not in self._verified:
                expect = self.manifest["files"][file]["sha256"]
            got = read_tensors(self.path / file, by_file[file], expect_sha256=expect)
            if expect is not None:
                with self._lock:
                    self._verified.add(file)
            return got

        files = sorted(by_file)
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        if files:
            with concurrent.futures.ThreadPoolExecutor(min(len(files), MAX_READERS)) as pool:
                loaded = dict(zip(files, pool.map(one, files)))
        return {name: loaded[file][key] for name, (file, key) in wanted.items()}

    def tensors(self, fqns: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Model tensors by FQN: the ones asked for (tied aliases resolved), or all saved ones. Fresh CPU tensors."""
        names = self._saved_names(fqns)
        return self._read({req: self._model[saved] for req, saved in names.items()})

    def optimizer_state(self, fqns: Iterable[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer tensors ``{fqn: {"exp_avg": t, ...}}`` of the FQNs asked for (those with no state are left out)."""
        names = self._saved_names(fqns)
        wanted = {(req, state): loc for req, saved in names.items()
                  for state, loc in self._optim.get(saved, {}).items()}
        flat = self._read({f"{req}::{state}": loc for (req, state), loc in wanted.items()})
        out: dict[str, dict[str, torch.Tensor]] = {}
        for (req, state) in wanted:
            out.setdefault(req, {})[state] = flat[f"{req}::{state}"]
        return out

    def optimizer_meta(self, fqns: Iterable[str] | None = None) -> dict[str, Any]:
        """The JSON half of the optimizer state for these FQNs: class, param groups (as FQNs), non-tensor state."""
        names = self._saved_names(fqns)
        groups: list[dict[str, Any]] = []
        group_of: dict[str, int] = {}
        state: dict[str, Any] = {}
        classes = set()
        for part in self.parts:
            opt = self.manifest["parts"][part].get("optimizer")
            if not opt:
                continue
            meta = opt["meta"]
            if meta.get("optimizer"):
                classes.add(meta["optimizer"])
            for group in meta.get("param_groups", []):
                for fqn in group["params"]:
                    group_of.setdefault(fqn, len(groups))
                groups.append({**group, "params": []})
            for fqn, values in meta.get("state", {}).items():
                state.setdefault(fqn, values)
        if len(classes) > 1:
            raise CheckpointError(f"parts of {self.path} were saved with different optimizers: {sorted(classes)}")
        out_state = {}
        for req, saved in names.items():
            if saved in group_of:
                groups[group_of[saved]]["params"].append(req)
            if saved in state:
                out_state[req] = state[saved]
        return {"optimizer": next(iter(classes), None), "param_groups": [g for g in groups if g["params"]],
                "state": out_state}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, step={self.step}, parts={self.parts})"
