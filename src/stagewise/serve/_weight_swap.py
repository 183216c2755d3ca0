"""A stage worker's weights by version: the version it runs, and at most one more, loaded into spare memory while
batches go on, until the batch that switches to it.

Versions have ids the gateway hands out (a label such as ``"40"`` travels with each for the answers). Stage 0
switches when the gateway says so, between two batches, and stamps every batch with the id of the version it ran;
a later stage switches when the first batch stamped with the new id reaches it. So every batch runs on one version in
every stage, and a replica switches without stopping: the gateway asks for the switch only once every stage of the
replica has the new version loaded.

A switch is a pointer swap per parameter (``param.data = new``: the captured graphs hold the same ``Parameter``
objects), so it costs microseconds; the old version's memory is freed with it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .._checkpoint_layout import MANIFEST, latest_checkpoint

__all__ = ["VERIFY", "StageVersions", "read_stage_weights"]

log = logging.getLogger(__name__)


VERIFY = ("sha256", "size")
"""How a Stagewise checkpoint is checked on load: every file read hashed (default), or sizes only (trusted files)."""


def read_stage_weights(path: str, expected: Mapping[str, torch.Tensor], *, aliases: Mapping[str, Sequence[str]],
                       dtype: torch.dtype, verify: str = "sha256") -> dict[str, torch.Tensor]:
    """This stage's tensors (``expected``: FQN -> a tensor of the right shape, meta will do) from ``path``, whatever
    layout wrote it. A Stagewise checkpoint is hashed as it is read (its manifest's sha256 of every file this stage
    reads; ``verify="size"``: sizes only): a corrupt or altered file raises before any weight is used. Other weights
    files (safetensors, Hugging Face folders, state_dicts) are read by name and checked by shape and kind of dtype."""
    root = Path(path)
    if root.is_dir() and ((root / MANIFEST).is_file() or latest_checkpoint(root) is not None):
        from ..checkpoint import load_checkpoint

        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        # each file this stage reads is hashed in the same pass
        ckpt = load_checkpoint(root, verify="read" if verify == "sha256" else "size")
        saved = set(ckpt.fqns())
        names = {}
        for fqn in expected:
            found = next((n for n in (fqn, *aliases.get(fqn, ())) if n in saved), fqn)  # tied: any of its names
            names[fqn] = found
        got = ckpt.tensors(list(dict.fromkeys(names.values())))
        out = {}
        for fqn, want in expected.items():
            t = got[names[fqn]]
            if tuple(t.shape) != tuple(want.shape):
                raise ValueError(f"{ckpt.path}: {fqn} has shape {list(t.shape)}, the served model expects "
                                 f"{list(want.shape)}; is it a checkpoint of this model?")
            out[fqn] = t.to(dtype if t.is_floating_point() else want.dtype)
        return out
    from ..weights import open_weights

    return open_weights(path).read(dict(expected), aliases=aliases, dtype=dtype)


@dataclasses.dataclass
class _Loaded:
    id: int
    label: str
    tensors: dict[str, torch.Tensor]


class StageVersions:
    """The version a worker's stage runs (``params``: FQN -> the ``Parameter`` its graphs hold) and the one loaded
    next. :meth:`load` may run on any thread; :meth:`use` runs on the thread that runs batches."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], *, id: int, label: str) -> None:
        self.params = dict(params)
        self.id, self.label = id, label
        self._next: _Loaded | None = None
        self._lock = threading.Lock()

    def load(self, id: int, label: str, path: str, *, aliases: Mapping[str, Sequence[str]],
             dtype: torch.dtype, verify: str = "sha256") -> None:
        """Read version ``id`` into spare memory (replacing a loaded one that was never switched to)."""
        with self._lock:
            self._next = None  # an older pending version is dropped first: at most two versions in memory
        expected = {n: p for n, p in self.params.items()}
        tensors = read_stage_weights(path, expected, aliases=aliases, dtype=dtype, verify=verify)
        for n, p in self.params.items():
            if tensors[n].dtype != p.dtype:
                raise ValueError(f"{path}: {n} reads as {tensors[n].dtype}, the served weight is {p.dtype}")
        with self._lock:
            self._next = _Loaded(id, label, tensors)

    def discard(self, id: int) -> None:
        """Drop loaded version ``id`` (a load that failed elsewhere, or was superseded)."""
        with self._lock:
            if self._next is not None and self._next.id == id:
                self._next = None

    def use(self, id: int) -> str:
        """Run version ``id`` from now on (switch to it when it is the loaded one); returns its label."""
        if id == self.id:
            return self.label
        with self._lock:
            loaded, self._next = self._next, None
        if loaded is None or loaded.id != id:
            have = f"{self.id} (running) and {loaded.id if loaded else 'none'} (loaded)"
            raise RuntimeError(f"asked to run weights version {id}, but this stage has {have} (please report this "
                               "as a bug)")
        with torch.no_grad():
            for n, p in self.params.items():
                p.data = loaded.tensors[n]
        self.id, self.label = loaded.id, loaded.label
        log.info("switched to weights version %s (%s)", loaded.label, loaded.id)
        return self.label
