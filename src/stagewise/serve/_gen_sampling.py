"""Sampling parameters and the next-token choice: greedy, temperature, top-k, top-p, seeded; stop tokens and strings.

Pure functions over one sequence's logits row, so a sequence samples the same tokens whatever else shares its batch:
each seeded request owns a ``torch.Generator``; an unseeded one draws its seed from the OS.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

import torch

from .._errors import StagewiseError

__all__ = ["SamplingError", "SamplingParams", "StopText", "choose_token"]


class SamplingError(StagewiseError, ValueError):
    """A sampling parameter out of range (names the parameter and its range)."""


@dataclasses.dataclass(kw_only=True, slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops (OpenAI names)."""

    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 means greedy (argmax); higher flattens the distribution."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose probabilities add up to top_p (1: all)."""
    seed: int | None = None
    """Seed of this request's generator: the same seed and prompt give the same tokens."""
    stop: tuple[str, ...] = ()
    """Strings that end the output (not included in it)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the output, besides the model's end-of-sequence ids (included as HF generate does)."""
    ignore_eos: bool = False
    """Keep going past the model's end-of-sequence tokens."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise SamplingError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def generator(self) -> torch.Generator | None:
        """This request's random generator (None when greedy)."""
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one sequence's ``logits`` (vocab,) float32."""
    if params.greedy or generator is None:
        return int(torch.argmax(logits))
    scores = logits.double() / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each
        drop = before >= params.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class StopText:
    """Incremental text of one sequence, cut at the first stop string; holds back what could start one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0
        self.stopped = False

    def advance(self, text: str, *, final: bool) -> str:
        """Given the whole decoded output so far, the new text that may be shown now ('' if none)."""
        if self.stopped:
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        else:
            end = len(text) if final else max(self.emitted, len(text) - self._hold)
            # a replacement char at the end is a partial multi-byte character: wait for the rest
            while not final and end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        new = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return new
