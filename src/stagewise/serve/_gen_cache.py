"""SlotCache: one stage's KV cache, preallocated as ``slots`` sequences of ``max_len`` tokens, as a Hugging Face Cache.

Why a Hugging Face ``Cache`` subclass: the stage runs the original model's own modules (see ``_gen_stage``), and every
decoder in ``transformers`` reaches its cache through the same few calls (``update`` from each attention layer,
``get_mask_sizes``/``get_query_offset``/``get_seq_length`` from the mask and position code). Answering those calls
for a batch of *slots* instead of a batch of contiguous sequences is all continuous batching needs: the model code,
its masks, rotary/ALiBi positions and attention kernels stay exactly Hugging Face's.

Layout per attention layer of this stage (allocated on the first write, which the stage makes at start-up, so the
memory is taken before serving): keys and values ``(slots, kv_heads, max_len, head_dim)``. A step names, per row, a
slot, the position its first new token goes to and its number of new tokens (rows of a batched prefill are padded at
the end to the longest). ``update`` writes the real new keys there and returns the rows' keys ``[0, kv_len)`` where
``kv_len`` is the step's longest; positions a row has not reached are masked by the 2D attention mask the stage
passes (a row of a batched decode sees only its own ``[0, position]``). Freeing a slot is the
scheduler's bookkeeping: a new sequence overwrites positions before it reads them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

__all__ = ["SlotCache"]


class SlotCache(Cache):
    """KV storage of ``slots`` sequences x ``max_len`` tokens for the attention layers this stage owns."""

    def __init__(self, *, slots: int, max_len: int) -> None:
        super().__init__(layers=[])
        self.slots, self.max_len = slots, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._rows = torch.zeros(0, dtype=torch.long)
        self._starts = torch.zeros(0, dtype=torch.long)
        self._lengths = torch.zeros(0, dtype=torch.long)
        self._q_len = 0
        self._kv_len = 0

    # ------------------------------------------------------------------ the step the stage is about to run
    def begin_step(self, rows: torch.Tensor, starts: torch.Tensor, q_len: int, lengths: torch.Tensor) -> int:
        """Rows ``rows`` (slot ids) write ``lengths`` new tokens each (at most ``q_len``: shorter rows are padded at
        the end) from position ``starts``; returns the kv length of the step.

        Rows of several tokens (prefills) batch only from position 0: the mask has one query offset for all rows.
        """
        if q_len > 1 and rows.numel() > 1 and bool(starts.any()):
            raise ValueError("prefill rows batch only from position 0; a continued prefill runs on its own")
        need = int((starts + lengths).max())
        if need > self.max_len:
            raise ValueError(f"sequence reaches {need} tokens; the KV cache holds {self.max_len} per sequence "
                             "(GenerateConfig.max_len)")
        self._rows, self._starts, self._q_len, self._lengths = rows, starts, q_len, lengths
        self._kv_len = int(starts.max()) + q_len
        return self._kv_len

    @property
    def bytes(self) -> int:
        """Bytes the allocated keys and values hold."""
        return sum(t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values())

    # ------------------------------------------------------------------ the Cache interface the models call
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.keys:
            b, h, _, d = key_states.shape  # (batch, kv_heads, q_len, head_dim)
            self.keys[layer_idx] = key_states.new_zeros(self.slots, h, self.max_len, d)
            self.values[layer_idx] = value_states.new_zeros(self.slots, *value_states.shape[1:2], self.max_len,
                                                             value_states.shape[-1])
        k, v = self.keys[layer_idx], self.values[layer_idx]
        rows, q = self._rows, self._q_len
        if q == 1:
            k[rows, :, self._starts] = key_states[:, :, 0]
            v[rows, :, self._starts] = value_states[:, :, 0]
        else:  # only the real tokens: a padded row's tail is never written (nor read: the mask hides it)
            for i, (s, p, n) in enumerate(zip(rows.tolist(), self._starts.tolist(), self._lengths.tolist())):
                k[s, :, p:p + n] = key_states[i, :, :n]
                v[s, :, p:p + n] = value_states[i, :, :n]
        if rows.numel() == 1:
            s = int(rows[0])
            return k[s:s + 1, :, :self._kv_len], v[s:s + 1, :, :self._kv_len]
        return k[rows, :, :self._kv_len], v[rows, :, :self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - self._q_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._kv_len - self._q_len

    def get_max_length(self, layer_idx: int = 0) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:  # type: ignore[override]
        return False

    @property
    def is_sliding(self) -> list[bool]:  # type: ignore[override]
        return []

    @property
    def is_linear(self) -> list[bool]:  # type: ignore[override]
        return []

    @property
    def is_dummy(self) -> list[bool]:  # type: ignore[override]
        return []
