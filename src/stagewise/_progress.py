"""What a user watches while a command works: a live display on stderr, shown only when stderr is a terminal.

Two shapes, one rule. :class:`StepProgress` is a bar over a known number of steps (training: step, loss, steps/s,
ETA); :class:`Phases` is a spinner naming what a command is doing now (``plan``: profiling, timing the optimizer,
searching; ``serve``: capturing, starting workers). Piped or redirected stderr (tests, logs, CI) gets no live display
at all: stdout and stderr stay plain text, and each phase is logged at INFO instead (``-v`` shows it). Both stop their
display on the way out of an error or Ctrl-C, so the one line the command prints then starts on a clean line.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

__all__ = ["Phases", "StepProgress", "live_display"]

log = logging.getLogger(__name__)


def live_display() -> bool:
    """Whether a live display may draw: stderr is a terminal (never when piped, redirected or captured)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


class StepProgress:
    """A bar over ``total`` steps: ``label``, the bar, done/total, the last loss, steps/s and the time left.

    ``enabled`` False (or stderr not a terminal) shows nothing; :attr:`enabled` then says so, so that a caller can
    print plain lines instead. Steps/s counts only the steps this run made (a resumed run starts at ``start``)."""

    def __init__(self, *, total: int, enabled: bool, start: int = 0, label: str = "train") -> None:
        self.enabled = enabled and live_display()
        self._first, self._start = start, time.perf_counter()
        self._bar: Any = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
                                 TimeRemainingColumn(), console=_console(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=start, loss="-", rate="-")

    def update(self, done: int, loss: float) -> None:
        """``done`` steps are finished, the last with ``loss``."""
        if self._bar is None:
            return
        rate = (done - self._first) / max(1e-9, time.perf_counter() - self._start)
        self._bar.update(self._task, completed=done, loss=f"{loss:.4f}", rate=f"{rate:.2f}")

    def close(self) -> None:
        """Stop drawing (the bar's last state stays on screen); safe to call twice."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class Phases:
    """A spinner naming the phase a command is in; a context manager.

    >>> with Phases("plan") as phase:      # doctest: +SKIP
    ...     phase("profiling 12 units")
    ...     phase("searching layouts")

    On a terminal the spinner is erased on exit (what follows is the command's own output); elsewhere each phase is a
    log record at INFO."""

    def __init__(self, command: str) -> None:
        self.command = command
        self._status: Any = None
        self.history: list[str] = []
        """Every phase announced so far, in order."""

    def __call__(self, text: str) -> None:
        """Enter the phase ``text`` (a few words: ``"capturing gpt"``)."""
        self.history.append(text)
        log.info("%s: %s", self.command, text)
        if self._status is not None:
            self._status.update(f"{self.command}: {text}")

    def __enter__(self) -> Phases:
        if live_display():
            self._status = _console().status(f"{self.command}: starting", spinner="dots")
            self._status.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Erase the spinner; safe to call twice."""
        if self._status is not None:
            self._status.stop()
            self._status = None
