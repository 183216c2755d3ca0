"""The continuous-batching scheduler of a generation pipeline: which sequences go into the next step. Pure: no I/O.

Every sequence holds one KV slot (on every stage) from admission to its end. A sequence is in at most one step at a
time (its next token needs the last one); up to ``inflight`` steps travel through the stages at once, so with P
stages and P steps in flight every stage has work. Each step takes the sequences that are ready (not in a step),
``ceil(ready / free steps)`` of them, so the running sequences spread over the steps in flight instead of riding in
one big batch that leaves all but one stage idle. Sequences join (prefill rows) and leave (finished, cancelled) at
every step; a cancelled or finished sequence's slot is free as soon as no step in flight carries it.

A row feeds the tokens its slot has not seen: the whole prompt on admission (or prompt + output so far, when a
sequence is re-run), one token per decode step.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

__all__ = ["Scheduler", "SeqState", "Step"]


@dataclasses.dataclass(eq=False, slots=True)
class SeqState:
    """One sequence as the scheduler sees it."""

    id: int
    tokens: list[int]
    """Prompt + output so far."""
    prompt_len: int
    slot: int | None = None
    cached: int = 0
    """Tokens of ``tokens`` whose keys and values are in the slot."""
    busy: bool = False
    """In a step in flight."""
    done: bool = False
    """Finished or cancelled: leaves at the end of its step in flight (at once if none)."""
    owner: Any = None
    """The backend's per-request object."""

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclasses.dataclass(slots=True)
class Step:
    """One step: rows ``(seq, start, new tokens)``, 1-token rows first."""

    number: int
    rows: list[tuple[SeqState, int, list[int]]]

    def table(self) -> tuple[list[list[int]], list[int]]:
        """``(meta rows [slot, start, q_len], flattened ids)`` as the workers take them."""
        meta = [[int(s.slot), start, len(new)] for s, start, new in self.rows]  # type: ignore[arg-type]
        return meta, [t for _, _, new in self.rows for t in new]


class Scheduler:
    """Admission queue, slots and steps in flight of one pipeline."""

    def __init__(self, *, slots: int, inflight: int, max_queue: int, max_batch_tokens: int) -> None:
        self.free_slots = list(range(slots - 1, -1, -1))
        self.slots, self.inflight_cap, self.max_queue = slots, inflight, max_queue
        self.max_batch_tokens = max_batch_tokens
        self.waiting: collections.deque[SeqState] = collections.deque()
        self.running: dict[int, SeqState] = {}
        self.inflight: dict[int, Step] = {}
        self._next_step = 0

    @property
    def used_slots(self) -> int:
        return self.slots - len(self.free_slots)

    def can_queue(self) -> bool:
        """Whether one more request may wait (a free slot or room in the queue)."""
        return len(self.waiting) < self.max_queue + len(self.free_slots)

    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)

    def release(self, seq: SeqState) -> None:
        """Mark ``seq`` done; its slot is freed now if no step carries it, else when that step returns."""
        seq.done = True
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif not seq.busy:
            self._free(seq)

    def _free(self, seq: SeqState) -> None:
        if seq.slot is not None and self.running.pop(seq.id, None) is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None

    def next_step(self) -> Step | None:
        """The next step to send, or None (no free step, or nothing ready)."""
        while self.waiting and self.free_slots:  # a free slot takes a waiting sequence even when no step can go
            seq = self.waiting.popleft()
            seq.slot, seq.cached = self.free_slots.pop(), 0
            self.running[seq.id] = seq
        if len(self.inflight) >= self.inflight_cap:
            return None
        ready = [s for s in self.running.values() if not s.busy and not s.done]
        if not ready:
            return None
        share = math.ceil(len(ready) / (self.inflight_cap - len(self.inflight)))
        decode = [s for s in ready if len(s.tokens) - s.cached == 1][:share]
        prefill = [s for s in ready if len(s.tokens) - s.cached > 1]
        rows = [(s, s.cached, s.tokens[s.cached:]) for s in decode]
        budget = self.max_batch_tokens - len(rows)
        for seq in prefill:  # each at most what is left of the step's token budget (the rest goes next step)
            if budget <= 0 and rows:
                break
            new = seq.tokens[seq.cached:][:max(budget, 1)]
            budget -= len(new)
            rows.append((seq, seq.cached, new))
        step = Step(self._next_step, rows)
        self._next_step += 1
        for seq, _, _ in rows:
            seq.busy = True
        self.inflight[step.number] = step
        return step

    def finish_step(self, number: int) -> Step:
        """Step ``number`` came back: its sequences are ready again (or freed, if done)."""
        step = self.inflight.pop(number)
        for seq, start, new in step.rows:
            seq.busy = False
            seq.cached = start + len(new)
            if seq.done:
                self._free(seq)
        return step

    def requeue_all(self) -> None:
        """The pipeline restarts: running sequences go back to the front of the queue (in arrival order) to be
        prefilled again from their tokens so far; steps in flight are forgotten and step numbers start again at 0."""
        running = sorted(self.running.values(), key=lambda s: s.id)
        for seq in running:
            seq.busy = False
            self._free(seq)
        self.waiting.extendleft(reversed([s for s in running if not s.done]))
        self.inflight.clear()
        self._next_step = 0

    def fail_all(self) -> list[SeqState]:
        """Every sequence, waiting or running (the pipeline is gone); the scheduler starts empty again."""
        seqs = list(self.waiting) + list(self.running.values())
        self.waiting.clear()
        for seq in list(self.running.values()):
            seq.busy = False
            self._free(seq)
        self.inflight.clear()
        return seqs
