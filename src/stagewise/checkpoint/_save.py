"""``CheckpointWriter``: every stage-owning rank saves its part, one rank commits the step atomically.

Protocol for a job of P stages x D replicas (replica 0 of each stage saves; the replicas hold the same weights)::

    writer = CheckpointWriter(root, keep=3)            # on every rank, before the first step
    ...
    writer.save_part(step, part=f"stage{s}", tensors=..., optimizer=..., optimizer_meta=..., extra_json=...)
    barrier()
    if rank == 0:
        writer.commit(step, parts=[f"stage{s}" for s in range(S)], partition=..., manifest_extra=...)

``save_part`` writes ``root/step-{k:08d}.tmp/{part}.model.safetensors`` and ``{part}.optim.safetensors`` (fsynced,
hashed while written) and a small ``{part}.part.json`` describing them. ``commit`` merges those descriptions into
``manifest.json``, renames ``step-k.tmp`` to ``step-k`` (fsyncing the directories), atomically points ``latest`` at
it and prunes old steps. Until that rename, the previous checkpoint is the one a loader finds: a crash at any moment
leaves it intact, and the half-written ``.tmp`` directory is ignored by loaders and removed by the next writer.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._format import (
    FORMAT,
    LATEST,
    MANIFEST,
    TMP_RE,
    VERSION,
    CheckpointError,
    canonical_checksum,
    fsync_dir,
    list_checkpoints,
    step_name,
    write_json_durable,
    write_text_durable,
)
from ._write import write_safetensors

__all__ = ["CheckpointWriter"]

log = logging.getLogger(__name__)

PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SIDECAR = ".part.json"


class CheckpointWriter:
    """Writes checkpoints under ``root``, keeping the newest ``keep`` of them (None keeps all).

    With ``clean`` (the default) the constructor removes what a crashed writer left: unfinished ``step-*.tmp``
    directories and half-deleted ones. In a multi-process job, construct every rank's writer before the first
    training step (no rank can reach a save before all ranks have started stepping), or pass ``clean=False`` on all
    ranks but one. ``save_part`` may be called from several threads at once for different parts.
    """

    def __init__(self, root: str | Path, *, keep: int | None = 3, clean: bool = True) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        if clean:
            self.clean()

    def clean(self, *, below: int | None = None) -> list[Path]:
        """Remove unfinished ``.tmp`` directories (only those of steps < ``below`` if given) and leftover trash."""
        removed = []
        for entry in self.root.iterdir():
            m = TMP_RE.match(entry.name)
            stale_tmp = m is not None and (below is None or int(m.group(1)) < below)
            if stale_tmp or ".trash-" in entry.name or (entry.name.startswith(f"{LATEST}.") and entry.is_file()):
                _remove(entry)
                removed.append(entry)
        if removed:
            log.info("removed %d leftover(s) of an unfinished checkpoint under %s: %s", len(removed), self.root,
                     ", ".join(p.name for p in removed))
        return removed

    def tmp_dir(self, step: int) -> Path:
        """Where the parts of ``step`` are written before the commit."""
        return self.root / f"{step_name(step)}.tmp"

    def save_part(
        self,
        step: int,
        *,
        part: str,
        tensors: Mapping[str, torch.Tensor],
        optimizer: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        optimizer_meta: Mapping[str, Any] | None = None,
        extra_json: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write one part of ``step``: its model tensors by FQN, its optimizer state by FQN, and JSON extras.

        ``optimizer`` is ``{fqn: {"exp_avg": t, "step": t, ...}}`` and ``optimizer_meta`` the JSON half, both as
        :func:`optimizer_state_by_fqn` returns them. ``extra_json`` is per-part JSON (e.g. this rank's
        ``rng_state_json()`` and ``lr_scheduler.state_dict()``). Returns the part's record (hashes, shapes).
        """
        _check_step(step)
        if not PART_RE.match(part):
            raise ValueError(f"part name {part!r} must be letters, digits, '_', '-' or '.' (e.g. 'stage0')")
        model = _checked_tensors(tensors, f"part {part!r} tensors")
        flat_optim: dict[str, torch.Tensor] = {}
        for fqn, entries in (optimizer or {}).items():
            for name, t in entries.items():
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"optimizer state {fqn}::{name} of part {part!r} is a {type(t).__name__}; put "
                                     "non-tensor values in optimizer_meta (optimizer_state_by_fqn does this)")
                flat_optim[f"{fqn}::{name}"] = t
        for what, value in (("optimizer_meta", optimizer_meta), ("extra_json", extra_json)):
            try:
                json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{what} of part {part!r} is not JSON-serialisable ({exc}); keep it to numbers, "
                                 "strings, bools, None, lists and dicts") from None
        tmp = self.tmp_dir(step)
        tmp.mkdir(parents=True, exist_ok=True)
        jobs = {"model": (f"{part}.model.safetensors", model)}
        if optimizer is not None:
            jobs["optim"] = (f"{part}.optim.safetensors", flat_optim)
        with concurrent.futures.ThreadPoolExecutor(len(jobs), thread_name_prefix="ckpt-write") as pool:
            futures = {kind: pool.submit(write_safetensors, tmp / name, ts) for kind, (name, ts) in jobs.items()}
            written = {kind: {"file": jobs[kind][0], **f.result()} for kind, f in futures.items()}
        record = {
            "part": part,
            "model": written["model"],
            "optim": written.get("optim"),
            "tensors": _describe(model),
            "optimizer": None if optimizer is None else {
                "tensors": _describe(flat_optim),
                "meta": dict(optimizer_meta or {}),
            },
            "extra": dict(extra_json or {}),
        }
        write_json_durable(tmp / f"{part}{SIDECAR}", record)
        fsync_dir(tmp)
        log.debug("step %d: saved part %s (%d bytes)", step, part,
                  sum(w["size"] for w in written.values()))
        return record

    def wait_for_parts(self, step: int, parts: Sequence[str], *, timeout: float) -> bool:
        """Wait until every part of ``step`` is saved (its sidecar written, the last thing ``save_part`` does), at
        most ``timeout`` seconds; True when they all are. For ranks that save in the background, without a barrier."""
        tmp = self.tmp_dir(step)
        deadline = time.monotonic() + timeout
        while True:
            if all((tmp / f"{part}{SIDECAR}").is_file() for part in parts):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def commit(
        self,
        step: int,
        *,
        parts: Sequence[str] | None = None,
        partition: Any = None,
        tied: Sequence[Sequence[str]] | None = None,
        manifest_extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Seal ``step``: write the manifest, rename ``step-k.tmp`` to ``step-k``, point ``latest`` at it, prune.

        Call it on one rank after every part was saved (after a barrier). ``parts`` names the parts that must be
        there (recommended: a missing one raises instead of committing an incomplete checkpoint); ``partition`` is
        a ``Partition`` or its dict/JSON; ``tied`` lists FQNs sharing one tensor (see :func:`tied_groups`);
        ``manifest_extra`` is run-wide JSON (data position, config...). Checkpoints of steps after ``step`` (left by
        a run that went further before this one resumed from an earlier step) are removed: ``latest`` now names
        ``step``, and they belong to the abandoned future. Returns the committed directory.
        """
        _check_step(step)
        tmp = self.tmp_dir(step)
        if not tmp.is_dir():
            raise CheckpointError(f"nothing was saved for step {step}: {tmp} does not exist; call save_part for "
                                  "every part before commit")
        saved = {p.name[: -len(SIDECAR)]: p for p in tmp.glob(f"*{SIDECAR}")}
        if parts is not None:
            missing = sorted(set(parts) - saved.keys())
            if missing:
                raise CheckpointError(f"step {step}: part(s) {missing} were not saved (no {{part}}{SIDECAR} in "
                                      f"{tmp}); every part's save_part must finish before commit")
        use = sorted(parts) if parts is not None else sorted(saved)
        if not use:
            raise CheckpointError(f"nothing was saved for step {step}: {tmp} holds no part")
        records = {p: json.loads(saved[p].read_text(encoding="utf-8")) for p in use}
        files: dict[str, dict[str, Any]] = {}
        for p, rec in records.items():
            for kind in ("model", "optim"):
                entry = rec.get(kind)
                if entry is None:
                    continue
                path = tmp / entry["file"]
                size = path.stat().st_size if path.is_file() else None
                if size != entry["size"]:
                    raise CheckpointError(f"step {step}: {path} has {size} bytes but part {p!r} wrote {entry['size']}")
                files[entry["file"]] = {"sha256": entry["sha256"], "size": entry["size"]}
                rec[kind] = entry["file"]
        _check_overlaps(records)
        body: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "writer": {"torch": torch.__version__, "python": platform.python_version()},
            "files": files,
            "parts": records,
            "partition": _partition_dict(partition),
            "tied": [list(g) for g in tied or []],
            "extra": dict(manifest_extra or {}),
        }
        body = json.loads(json.dumps(body))  # exactly what a reader will parse (tuples -> lists, int keys -> str)
        body["checksum"] = canonical_checksum(body)
        write_json_durable(tmp / MANIFEST, body)
        for entry in tmp.iterdir():  # sidecars, and stray parts of a crashed run that this commit does not include
            if entry.name not in files and entry.name != MANIFEST:
                _remove(entry)
        fsync_dir(tmp)
        final = self.root / step_name(step)
        trash = None
        if final.exists():  # a checkpoint of the same step from an earlier run: replace it
            trash = final.with_name(f"{final.name}.trash-{os.getpid()}")
            os.rename(final, trash)
        os.rename(tmp, final)
        fsync_dir(self.root)
        write_text_durable(self.root / LATEST, final.name + "\n")
        fsync_dir(self.root)
        if trash is not None:
            _remove(trash)
        self._prune(step)
        log.info("checkpoint %s committed (%d parts, %d bytes)", final, len(records),
                 sum(f["size"] for f in files.values()))
        return final

    def save(
        self,
        step: int,
        *,
        tensors: Mapping[str, torch.Tensor],
        optimizer: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        optimizer_meta: Mapping[str, Any] | None = None,
        extra_json: Mapping[str, Any] | None = None,
        partition: Any = None,
        tied: Sequence[Sequence[str]] | None = None,
        manifest_extra: Mapping[str, Any] | None = None,
        part: str = "model",
    ) -> Path:
        """One process, one part: ``save_part`` then ``commit``."""
        self.save_part(step, part=part, tensors=tensors, optimizer=optimizer, optimizer_meta=optimizer_meta,
                       extra_json=extra_json)
        return self.commit(step, parts=[part], partition=partition, tied=tied, manifest_extra=manifest_extra)

    def _prune(self, step: int) -> None:
        complete = list_checkpoints(self.root)
        for k, d in complete:
            if k > step:
                log.warning("removing %s: it is newer than the checkpoint just committed (step %d), so it belongs "
                            "to a run this one resumed before", d, step)
                _remove(d)
        older = [d for k, d in complete if k <= step]
        if self.keep is not None:
            for d in older[: -self.keep]:
                _remove(d)
        self.clean(below=step)


def _check_step(step: int) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def _checked_tensors(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or "::" in name:
            raise ValueError(f"{what}: key {name!r} must be a non-empty FQN string without '::'")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {name!r} is a {type(t).__name__}, not a tensor")
        out[name] = t
    return out


def _describe(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for k, t in tensors.items()}


def _check_overlaps(records: Mapping[str, Mapping[str, Any]]) -> None:
    """An FQN saved by two parts must agree on shape and dtype (loaders read it from the first part)."""
    seen: dict[str, tuple[str, Any]] = {}
    for p, rec in records.items():
        for fqn, desc in rec["tensors"].items():
            if fqn in seen and seen[fqn][1] != desc:
                raise CheckpointError(f"{fqn!r} is saved by parts {seen[fqn][0]!r} ({seen[fqn][1]}) and {p!r} "
                                      f"({desc}) with different shapes/dtypes; each FQN must have one owner")
            seen.setdefault(fqn, (p, desc))


def _partition_dict(partition: Any) -> Any:
    if partition is None or isinstance(partition, dict):
        return partition
    if isinstance(partition, str):
        return json.loads(partition)
    if hasattr(partition, "to_dict"):
        return partition.to_dict()
    raise ValueError(f"partition must be a Partition, a dict or a JSON string, got {type(partition).__name__}")


def _remove(path: Path) -> None:
    """Delete a file or a directory tree; a directory is first renamed away so that a crash leaves no half of it."""
    try:
        if path.is_dir():
            if ".trash-" not in path.name:
                trash = path.with_name(f"{path.name}.trash-{os.getpid()}")
                os.rename(path, trash)
                path = trash
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
