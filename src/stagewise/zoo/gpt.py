"""A tiny GPT in one readable file (nanoGPT style), plus the ``tiny_gpt`` zoo factory.

token + position embeddings -> N pre-LayerNorm blocks (causal self-attention, MLP) -> final LayerNorm -> LM head.
The LM head's weight is *tied* to the token embedding (one Parameter used at both ends of the network), which is the
case a pipeline splitter must handle: the first and last stage share a weight.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from stagewise._spec import ModelSpec
from stagewise.zoo.basic import Samples, seeded

__all__ = [
    "GPT",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "GPTConfig",
    "arithmetic_sequences",
    "next_token_loss",
    "tiny_gpt",
]


@dataclasses.dataclass(kw_only=True)
class GPTConfig:
    """Sizes of a :class:`GPT`."""

    vocab_size: int = 64
    """Number of token ids."""
    block_size: int = 16
    """Longest sequence the position embedding covers."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 2
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 32
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention and residual branches."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble heads side by side: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer: (B, T) token ids -> (B, T, vocab_size) next-token logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading tokens in and writing logits out use the same matrix (fewer parameters, and it
        # trains better). After this line there is a single Parameter reachable under two names.
        self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        # GPT-2 scales the residual output projections by 1/sqrt(2 * n_layer) so the residual stream does not grow
        # with depth (two residual additions per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        # No Python-level length check (it would break graph tracing); T > block_size fails in wpe's index lookup.
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) -> (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        x = self.ln_f(x)
        return self.lm_head(x)  # (B, T, vocab_size)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy of (B, T, V) logits against (B, T) next-token ids."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def arithmetic_sequences(n: int, length: int, vocab_size: int, *, seed: int) -> torch.Tensor:
    """(n, length) token sequences ``(start + step * t) % vocab_size``: a pattern a model can learn from 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (n, 1), generator=g)
    step = torch.randint(1, 8, (n, 1), generator=g)
    return (start + step * torch.arange(length)) % vocab_size


def tiny_gpt(
    *,
    batch: int = 4,
    vocab_size: int = 64,
    n_layer: int = 4,
    n_embd: int = 32,
    n_head: int = 2,
    block_size: int = 16,
    n_samples: int = 512,
    seed: int = 0,
) -> ModelSpec:
    """A 4-layer tiny GPT on (batch, block_size) token ids; next-token cross-entropy on arithmetic sequences."""
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    with seeded(seed):
        model = GPT(config)
    ids = arithmetic_sequences(batch, block_size, vocab_size, seed=seed + 1)

    def dataset() -> Samples:
        seqs = arithmetic_sequences(n_samples, block_size + 1, vocab_size, seed=seed + 2)
        return Samples((seqs[:, :-1],), (seqs[:, 1:],))  # targets are the inputs shifted left by one

    return ModelSpec(model=model, args=(ids,), loss=next_token_loss, dataset=dataset, name="tiny_gpt")
