"""GenStage: one pipeline stage of a Hugging Face decoder, run on the model's own modules with a slot KV cache.

Why run the original modules, and not a captured graph: a decode step's shapes change every step (kv length, batch
of live sequences), a static-cache export fixes them at capture time and pays a graph per (batch, length) bucket, and
the models' mask, rotary and ALiBi code already handles a cache through the ``Cache`` interface. So a stage keeps the
original ``*ForCausalLM`` object with its decoder-layer list cut to the layers it owns, and hands it a
:class:`~._gen_cache.SlotCache` holding only those layers (the layers keep their global ``layer_idx``). Nothing is
written per architecture; what is found generically:

- the decoder-layer list: the model's largest ``nn.ModuleList`` whose length is ``num_hidden_layers``;
- what runs before it (embeddings, their norm) and after it (final norm, LM head): the modules with parameters that
  the base model registers before / after the list, and the head outside the base model.

A stage after the first does not hold the embeddings: they become stubs (an embedding answers zeros of its shape,
anything else passes its input through) and a pre-hook on its first layer puts the activations received from the
previous stage in their place. A stage before the last stops the forward at its last layer (a hook raises
:class:`_Handoff` with the layer's output), so the final norm and head it does not hold never run. Positions, masks
and ALiBi biases are still computed by the model on every stage from the step's ``position_ids`` and 2D mask (they
hold no weights), so every stage sees exactly what the single-process model would.

Exactness: covered by tests comparing greedy output with ``model.generate(do_sample=False)`` for the zoo's decoders.
Architectures whose layers need more than ``hidden_states`` from the layer before (encoder-decoders, models with
cross-layer state such as shared KV between layers) are not covered.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from .._errors import ConfigError, StagewiseError

__all__ = ["GenStage", "StepRows", "UnsupportedModelError", "layer_split", "slots_in_budget"]


class UnsupportedModelError(StagewiseError, ValueError):
    """The model is not a decoder that GenStage can split (no decoder-layer list found, or not a causal LM)."""


class _Handoff(Exception):  # noqa: N818 - control flow, never seen by users
    """Raised by the last owned layer's hook of a non-last stage: carries its output hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _ZeroEmbedding(nn.Module):
    """Stands for an embedding a later stage does not hold: zeros of the embedding's output shape."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


class _PassThrough(nn.Module):
    """Stands for a module with weights this stage does not hold and whose output is replaced (or never used)."""

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The FQN and module of the decoder-layer list: the largest ModuleList of ``num_hidden_layers`` entries."""
    n = getattr(_text_config(model), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__}: no list of {n} decoder layers found; generation serves "
                                    "decoder-only causal language models (a *ForCausalLM with a layer list)")
    return max(found, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def layer_split(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges ``[a, b)`` per stage, as even as possible (earlier stages get the extra layers)."""
    if not 1 <= stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} decoder layers into {stages} stages (1..{n_layers})")
    base, extra = divmod(n_layers, stages)
    bounds, a = [], 0
    for s in range(stages):
        b = a + base + (s < extra)
        bounds.append((a, b))
        a = b
    return bounds


@dataclasses.dataclass(frozen=True, slots=True)
class StepRows:
    """One forward of a stage: ``rows`` sequences (slot ids), each writing its ``lengths`` tokens from ``starts``,
    padded at the end to ``q_len``."""

    slots: torch.Tensor
    """(rows,) int64 slot ids."""
    starts: torch.Tensor
    """(rows,) int64 position of each row's first new token."""
    lengths: torch.Tensor
    """(rows,) int64 new tokens of each row (1 for a decode)."""

    @property
    def q_len(self) -> int:
        return int(self.lengths.max())


class GenStage:
    """Stage ``stage`` of ``stages`` of a Hugging Face causal LM (the model is cut in place: pass a fresh one)."""

    def __init__(self, model: nn.Module, *, stage: int, stages: int, slots: int, max_len: int) -> None:
        from ._gen_cache import SlotCache  # transformers is imported only by processes that generate

        if not 0 <= stage < stages:
            raise ValueError(f"stage {stage} of {stages}")
        model.eval()
        self.model, self.stage, self.stages = model, stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        list_name, layers = _layer_list(model)
        self.layer_range = layer_split(len(layers), stages)[stage]
        a, b = self.layer_range
        owned = nn.ModuleList(list(layers)[a:b])
        base_name, _, attr = list_name.rpartition(".")
        base = model.get_submodule(base_name)
        names = list(dict(base.named_children()))
        before = set(names[:names.index(attr)])
        setattr(base, attr, owned)
        emb = model.get_input_embeddings()
        self.hidden_size = int(emb.embedding_dim)
        dtype = emb.weight.dtype
        if not self.first:
            for name in before:
                child = base.get_submodule(name)
                if any(True for _ in child.parameters()):
                    embedding = isinstance(child, nn.Embedding)
                    setattr(base, name, _ZeroEmbedding(self.hidden_size, dtype) if embedding else _PassThrough())
            owned[0].register_forward_pre_hook(self._inject, with_kwargs=True)
        if not self.last:
            after = set(names[names.index(attr) + 1:])
            for name in after:
                if any(True for _ in base.get_submodule(name).parameters()):
                    setattr(base, name, _PassThrough())
            for name, child in list(model.named_children()):
                if child is not base and not _contains(child, base) and any(True for _ in child.parameters()):
                    setattr(model, name, _PassThrough())
            owned[-1].register_forward_hook(self._handoff)
        self.cache = SlotCache(slots=slots, max_len=max_len)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._pass_positions = "position_ids" in params
        self._incoming: torch.Tensor | None = None
        self._last_index = torch.zeros(0, dtype=torch.long)
        if self.last:
            head = model.get_output_embeddings()
            if head is None:
                raise UnsupportedModelError(f"{type(model).__name__} has no output embeddings (LM head)")
            head.register_forward_pre_hook(self._pick_last)
        self.dtype = dtype

    # ------------------------------------------------------------------ hooks
    def _inject(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = self._incoming
        assert hidden is not None
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _pick_last(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        hidden = args[0]  # (rows, q_len, hidden)
        return (hidden[torch.arange(hidden.shape[0]), self._last_index][:, None], *args[1:])

    def _handoff(self, module: nn.Module, args: Any, output: Any) -> None:
        raise _Handoff(output[0] if isinstance(output, (tuple, list)) else output)

    # ------------------------------------------------------------------ one forward
    @torch.inference_mode()
    def forward(self, step: StepRows, ids: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``ids`` (rows, q_len) through this stage, KV written to the step's slots.

        ``hidden``: the previous stage's output (rows, q_len, hidden), for a stage after the first. Returns this
        stage's output hidden states (rows, q_len, hidden), or on the last stage the next-token logits (rows, vocab)
        in float32.
        """
        kv_len = self.cache.begin_step(step.slots, step.starts, step.q_len, step.lengths)
        rows = int(step.slots.numel())
        ends = step.starts + step.lengths  # (rows,)
        mask = (torch.arange(kv_len)[None, :] < ends[:, None]).long()  # (rows, kv_len)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, self._cache_kw: self.cache,
                                  "use_cache": True}
        if self._pass_positions:
            kwargs["position_ids"] = step.starts[:, None] + torch.arange(step.q_len)[None, :]
        self._last_index = step.lengths - 1  # the head runs on each row's last real token only (see _pick_last)
        if not self.first:
            if hidden is None or tuple(hidden.shape) != (rows, step.q_len, self.hidden_size):
                raise ValueError(f"stage {self.stage} expects hidden states of shape {(rows, step.q_len)} + "
                                 f"({self.hidden_size},), got {None if hidden is None else tuple(hidden.shape)}")
            self._incoming = hidden.to(self.dtype)
        try:
            out = self.model(**kwargs)
        except _Handoff as handoff:
            return handoff.hidden
        finally:
            self._incoming = None
        if not self.last:
            raise RuntimeError(f"stage {self.stage} ran past its last layer (please report this as a bug)")
        return out.logits[:, -1].float()  # (rows, vocab): _pick_last gave the head one position per row

    def run_rows(self, meta: torch.Tensor, ids: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
        """Run one pipeline step: ``meta`` (rows, 3) = (slot, start, q_len) per row, ``ids`` the rows' new tokens
        flattened in row order, ``hidden`` the previous stage's output flattened the same way (tokens, hidden).

        A run of 1-token rows is one batched forward, a run of fresh prefills (from position 0) another (padded at
        the end to the longest: a real token never attends to a later position, so padding changes none of its
        values); a continued prefill chunk runs on its own. Returns (tokens, hidden) in row order, or on the last
        stage (rows, vocab) logits.
        """
        outs: list[torch.Tensor] = []
        r, off, n_rows = 0, 0, int(meta.shape[0])
        q_lens, starts = meta[:, 2].tolist(), meta[:, 1].tolist()
        while r < n_rows:
            end = r + 1
            if q_lens[r] == 1:  # a decode batch
                while end < n_rows and q_lens[end] == 1:
                    end += 1
            elif starts[r] == 0:  # fresh prefills batch together, padded at the end to the longest
                while end < n_rows and q_lens[end] > 1 and starts[end] == 0:
                    end += 1
            lengths = meta[r:end, 2]
            q, n = int(lengths.max()), int(lengths.sum())
            step = StepRows(meta[r:end, 0], meta[r:end, 1], lengths)
            out = self.forward(step, _padded(ids[off:off + n], q_lens[r:end], q),
                               None if hidden is None else _padded(hidden[off:off + n], q_lens[r:end], q))
            outs.append(out if self.last else torch.cat([out[i, :k] for i, k in enumerate(q_lens[r:end])]))
            r, off = end, off + n
        return torch.cat(outs)

    def warm_up(self) -> int:
        """Allocate the KV cache (a 1-token step on slot 0) before serving; returns its bytes."""
        zero = torch.zeros(1, dtype=torch.long)
        step = StepRows(zero, zero, zero + 1)
        ids = torch.zeros(1, 1, dtype=torch.long)
        hidden = None if self.first else torch.zeros(1, 1, self.hidden_size, dtype=self.dtype)
        self.forward(step, ids, hidden)
        return self.cache.bytes


def _padded(flat: torch.Tensor, lengths: list[int], q: int) -> torch.Tensor:
    """Rows of ``lengths`` items flattened in ``flat`` (tokens, ...) as (rows, q, ...), zero-padded at the end."""
    if all(k == q for k in lengths):
        return flat.reshape(len(lengths), q, *flat.shape[1:])
    out = flat.new_zeros(len(lengths), q, *flat.shape[1:])
    off = 0
    for i, k in enumerate(lengths):
        out[i, :k] = flat[off:off + k]
        off += k
    return out


def _contains(module: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in module.modules())


def slots_in_budget(model: nn.Module, *, stages: int, max_len: int, budget_bytes: int) -> int:
    """Sequences of ``max_len`` tokens whose KV cache fits ``budget_bytes`` on the stage with the most layers.

    Measured, not computed from the config: a 1-slot cache of every layer, allocated by a 1-token step, so
    grouped-query, multi-query and ALiBi models alike are sized by what their attention actually caches. Cuts
    ``model`` (pass one that is not used afterwards).
    """
    probe = GenStage(model, stage=0, stages=1, slots=1, max_len=max_len)
    per_slot = probe.warm_up()  # bytes of one sequence in every layer
    layers = probe.layer_range[1]
    most = max(b - a for a, b in layer_split(layers, stages))
    per_stage = per_slot * most / layers
    if budget_bytes < per_stage:
        raise ConfigError(f"a KV-cache budget of {budget_bytes / 2**20:g} MiB holds no sequence: one sequence of "
                          f"{max_len} tokens takes {per_stage / 2**20:.3f} MiB on a stage of {most} layers (raise "
                          "GenerateConfig.kv_budget_mb or lower max_len)")
    return int(budget_bytes // per_stage)
