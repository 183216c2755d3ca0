"""Under torchrun one rank splits the model for all: rank 0 captures it once (on the meta device when the run
builds there) and publishes every pipeline position's stages through the rendezvous store, as data
(:meth:`~stagewise.split.StagePack.to_bytes`: JSON and safetensors, nothing pickled); every other rank reads its own
and never captures the model."""

from __future__ import annotations

import datetime
import logging
from typing import Any

from .._errors import StagewiseError
from .._spec import import_model_code
from ..split import StagePack
from ._config import TrainConfig
from ._rank import Layout, rank_packs

__all__ = ["SharedSplitError", "shared_pack"]

log = logging.getLogger(__name__)

_FAILED = b"STAGEWISE-SPLIT-FAILED\n"
SPLIT_WAIT_S = 600.0
"""How long a rank waits for rank 0's split at the least (capturing a large model takes a while)."""


class SharedSplitError(StagewiseError, RuntimeError):
    """Rank 0 could not split the model, or did not publish a rank's stages in time."""


def _key(position: int) -> str:
    return f"stagewise/stages/position{position}"


def shared_pack(config: TrainConfig, store: Any, rank: int) -> StagePack:
    """This rank's stages, split once by rank 0 and shared through ``store`` (a ``torch.distributed`` store)."""
    layout = Layout(config)
    _, position = layout.place(rank)
    trusted = import_model_code(config.model)  # custom operators; the model's own output classes
    if rank == 0:
        try:
            packs = {p: pack.to_bytes() for p, pack in rank_packs(config).items()}
        except Exception as exc:  # the other ranks fail at once with rank 0's reason, not after a timeout
            for p in range(layout.P):
                store.set(_key(p), _FAILED + f"{type(exc).__name__}: {exc}".encode())
            raise
        for p, data in packs.items():
            store.set(_key(p), data)
        log.info("rank 0: split %s into %d stages and published them (%s bytes per position)", config.model,
                 layout.S, ", ".join(str(len(d)) for d in packs.values()))
        data = packs[position]
    else:
        wait_s = max(SPLIT_WAIT_S, config.runtime.timeout)
        try:
            store.wait([_key(position)], datetime.timedelta(seconds=wait_s))
        except RuntimeError as exc:  # torch's DistStoreError (a RuntimeError) on timeout or a lost store
            raise SharedSplitError(f"rank {rank}: rank 0 did not publish the stages of pipeline position {position} "
                                   f"within {wait_s:.0f} s ({exc}); rank 0 splits the model for every rank: see its "
                                   "log") from None
        data = store.get(_key(position))
        if data.startswith(_FAILED):
            raise SharedSplitError(f"rank {rank}: rank 0 could not split the model: "
                                   f"{data[len(_FAILED):].decode(errors='replace')}")
        log.info("rank %d: took the stages of position %d from rank 0 (%d bytes); not capturing the model", rank,
                 position, len(data))
    return StagePack.from_bytes(data, trusted_modules=trusted)
