"""A live progress bar (loss, steps/s, ETA) for rank 0."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, *, total: int, enabled: bool) -> None:
        self.enabled = enabled and sys.stdout.isatty()
        self.total = total
        self._start = time.perf_counter()
        self._bar = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
                                     TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, loss="-", rate="-")

    def update(self, done: int, loss: float) -> None:
        if self._bar is None:
            return
        rate = done / max(1e-9, time.perf_counter() - self._start)
        self._bar.update(self._task, completed=done, loss=f"{loss:.4f}", rate=f"{rate:.2f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
