"""``stagewise serve CKPT_DIR --watch``: follow a training run's checkpoint root and serve each step it commits.

A checkpoint is committed by renaming its finished ``step-N.tmp`` directory to ``step-N`` once its manifest is written
(``checkpoint``), so a step directory with a manifest is complete: the watcher never sees a half-written one. Each
poll loads the newest step newer than the last one seen (steps committed faster than they load are skipped, never
mixed); a step that fails to load (corrupt, pruned meanwhile) is reported and skipped, and the old version serves on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from .._checkpoint_layout import list_checkpoints
from ._live_update import LiveUpdates, checkpoint_step
from ._protocol import ServeError

__all__ = ["CheckpointWatcher"]

log = logging.getLogger(__name__)


class CheckpointWatcher:
    """Loads each new committed step under ``root`` into every backend, polling every ``interval_s`` seconds from a
    thread of its own (:meth:`start`, :meth:`stop`); :meth:`poll` does one round (tests call it directly)."""

    def __init__(self, backends: Sequence[LiveUpdates], root: str | Path, *, interval_s: float = 2.0) -> None:
        if not interval_s > 0:
            raise ValueError(f"--watch-interval must be > 0, got {interval_s}")
        self.backends, self.root, self.interval_s = list(backends), Path(root), interval_s
        found = checkpoint_step(self.root)
        self.last_step = found[1] if found else -1
        """The newest step seen (loaded, or refused)."""
        self.errors: list[str] = []
        """Why steps were refused, oldest first."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stagewise-serve-watch", daemon=True)

    def poll(self) -> int | None:
        """Load the newest committed step newer than the last one seen; returns its step, or None when none is new."""
        found = list_checkpoints(self.root)
        if not found or found[-1][0] <= self.last_step:
            return None
        step, step_dir = found[-1]
        self.last_step = step
        for backend in self.backends:
            try:
                backend.load(checkpoint=str(step_dir))
            except ServeError as exc:
                self.errors.append(str(exc))
                log.warning("watch: step %s of %s not served: %s", step, self.root, exc)
        return step

    def start(self) -> CheckpointWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a watcher that dies silently would stop updates unnoticed
                log.exception("watch: polling %s failed; trying again in %.1f s", self.root, self.interval_s)
