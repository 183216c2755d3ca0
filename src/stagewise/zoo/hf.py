"""Unmodified Hugging Face ``transformers`` models, built from their config classes with random weights.

Nothing is downloaded. Each model is tiny (2 layers, hidden 32, 2 heads, intermediate 64, vocab 128, 64 positions)
and otherwise uses its config's defaults: attention implementation, caching, dropout and the rest are left alone, so
the zoo tests a splitter against the models as users get them. Inputs are ``input_ids`` (batch, 12) with an
all-ones ``attention_mask`` plus ``labels``, so ``output.loss`` holds the loss (``spec.loss`` is None).

``transformers`` is imported lazily: importing this module does not need it, calling a factory does.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch

from stagewise._spec import ModelSpec
from stagewise.zoo.basic import Samples, seeded
from stagewise.zoo.gpt import arithmetic_sequences

__all__ = [
    "HF_MODELS",
    "albert",
    "bart",
    "bert",
    "bloom",
    "distilbert",
    "electra",
    "falcon",
    "gemma",
    "gpt2",
    "gpt_neo",
    "gpt_neox",
    "gptj",
    "llama",
    "mistral",
    "mpt",
    "opt",
    "phi",
    "qwen2",
    "qwen3",
    "roberta",
    "t5",
    "vit",
    "whisper",
]

VOCAB = 128
LAYERS = 2
HIDDEN = 32
HEADS = 2
INTERMEDIATE = 64
POSITIONS = 64
SEQ_LEN = 12


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError("the Hugging Face zoo models need transformers: pip install transformers") from exc


def _fitted_special_tokens(config_cls: type, vocab_size: int, given: dict[str, Any]) -> dict[str, Any]:
    """Special-token ids to pass so none falls outside the tiny vocabulary: out-of-range defaults go last, in order.

    Full-size defaults such as GPT-2's ``<|endoftext|>`` = 50256 do not exist in a 128-token vocabulary (a padding id
    past the end even makes ``nn.Embedding`` fail). Real vocabularies put such tokens last, so we do too; ids that
    already fit, and ids the caller gave, are left alone. Config classes are dataclasses, so the defaults are known
    before construction (constructing first would log a warning per bad id).
    """
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(config_cls)
        if f.name.endswith("token_id") and f.name not in given and f.default is not dataclasses.MISSING
    }
    too_big = sorted({i for v in defaults.values() for i in _as_ids(v) if i >= vocab_size})
    remap = {old: vocab_size - len(too_big) + rank for rank, old in enumerate(too_big)}
    fitted: dict[str, Any] = {}
    for name, value in defaults.items():
        if isinstance(value, int) and value in remap:
            fitted[name] = remap[value]
        elif isinstance(value, (list, tuple)) and any(i in remap for i in value):
            fitted[name] = type(value)(remap.get(i, i) for i in value)
    return fitted


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [i for i in value if isinstance(i, int)]
    return []


def _build(config_cls: str, model_cls: str, seed: int, **config_kwargs: Any) -> torch.nn.Module:
    tf = _transformers()
    cls = getattr(tf, config_cls)
    if "vocab_size" in config_kwargs:
        config_kwargs.update(_fitted_special_tokens(cls, config_kwargs["vocab_size"], config_kwargs))
    config = cls(**config_kwargs)
    with seeded(seed):
        return getattr(tf, model_cls)(config)


def _text_spec(
    name: str, config_cls: str, model_cls: str, *, batch: int, seq_len: int, n_samples: int, seed: int, **config: Any
) -> ModelSpec:
    """A text model fed ``input_ids``/``attention_mask``/``labels`` where ``labels`` are the ids themselves.

    For a causal LM that is next-token prediction (the model shifts internally), for a masked LM and a seq2seq model
    it is reconstruction; the arithmetic-sequence data makes every one of them learnable.
    """
    model = _build(config_cls, model_cls, seed, vocab_size=VOCAB, **config)

    def batch_of(n: int, data_seed: int) -> dict[str, torch.Tensor]:
        ids = arithmetic_sequences(n, seq_len, VOCAB, seed=data_seed)  # (n, seq_len) int64
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def dataset() -> Samples:
        return Samples(batch_of(n_samples, seed + 2))

    return ModelSpec(model=model, kwargs=batch_of(batch, seed + 1), loss=None, dataset=dataset, name=name)


# Keyword sets shared by several config classes (BERT-style and Llama-style naming).
_BERT_SIZES = dict(
    num_hidden_layers=LAYERS,
    hidden_size=HIDDEN,
    num_attention_heads=HEADS,
    intermediate_size=INTERMEDIATE,
    max_position_embeddings=POSITIONS,
)
_LLAMA_SIZES = dict(_BERT_SIZES, head_dim=HIDDEN // HEADS)


def gpt2(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """GPT2LMHeadModel (learned positions, Conv1D projections, tied LM head)."""
    return _text_spec(
        "gpt2", "GPT2Config", "GPT2LMHeadModel", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=POSITIONS,
    )  # fmt: skip


def bert(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """BertForMaskedLM (encoder-only, token-type embeddings, tied MLM head)."""
    return _text_spec(
        "bert", "BertConfig", "BertForMaskedLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        **_BERT_SIZES,
    )  # fmt: skip


def llama(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """LlamaForCausalLM (RMSNorm, rotary positions, SwiGLU MLP, untied LM head)."""
    return _text_spec(
        "llama", "LlamaConfig", "LlamaForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        **_LLAMA_SIZES,
    )  # fmt: skip


def t5(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """T5ForConditionalGeneration (encoder-decoder, relative position buckets, decoder inputs made from labels)."""
    return _text_spec(
        "t5", "T5Config", "T5ForConditionalGeneration", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        num_layers=LAYERS, d_model=HIDDEN, num_heads=HEADS, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE,
        # Every published T5 config sets this (to the pad id); T5Config has no default, and without it the model
        # cannot turn labels into decoder inputs.
        decoder_start_token_id=0,
    )  # fmt: skip


def albert(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """AlbertForMaskedLM: one layer's weights SHARED by all layers, factorised (smaller) embeddings."""
    return _text_spec(
        "albert", "AlbertConfig", "AlbertForMaskedLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        embedding_size=HIDDEN // 2, **_BERT_SIZES,
    )  # fmt: skip


def roberta(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """RobertaForMaskedLM (positions offset past the padding id)."""
    return _text_spec(
        "roberta", "RobertaConfig", "RobertaForMaskedLM", batch=batch, seq_len=seq_len, n_samples=n_samples,
        seed=seed, **_BERT_SIZES,
    )  # fmt: skip


def distilbert(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """DistilBertForMaskedLM (no token types, sinusoidal-or-learned positions)."""
    return _text_spec(
        "distilbert", "DistilBertConfig", "DistilBertForMaskedLM", batch=batch, seq_len=seq_len, n_samples=n_samples,
        seed=seed, n_layers=LAYERS, dim=HIDDEN, n_heads=HEADS, hidden_dim=INTERMEDIATE,
        max_position_embeddings=POSITIONS,
    )  # fmt: skip


def electra(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """ElectraForMaskedLM (generator), embeddings projected up to the hidden size."""
    return _text_spec(
        "electra", "ElectraConfig", "ElectraForMaskedLM", batch=batch, seq_len=seq_len, n_samples=n_samples,
        seed=seed, embedding_size=HIDDEN // 2, **_BERT_SIZES,
    )  # fmt: skip


def opt(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """OPTForCausalLM (learned positions with an offset, tied LM head)."""
    return _text_spec(
        "opt", "OPTConfig", "OPTForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_dim=INTERMEDIATE,
        max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
    )  # fmt: skip


def gpt_neo(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """GPTNeoForCausalLM (alternating global and local attention layers, as in the default pattern)."""
    return _text_spec(
        "gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, intermediate_size=INTERMEDIATE,
        max_position_embeddings=POSITIONS, attention_types=[[["global", "local"], LAYERS // 2]],
    )  # fmt: skip


def gpt_neox(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """GPTNeoXForCausalLM (parallel attention + MLP residual, partial rotary)."""
    return _text_spec(
        "gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples,
        seed=seed, **_BERT_SIZES,
    )  # fmt: skip


def gptj(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """GPTJForCausalLM (parallel attention + MLP, rotary on a quarter of each head as in GPT-J 6B)."""
    return _text_spec(
        "gptj", "GPTJConfig", "GPTJForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=INTERMEDIATE, n_positions=POSITIONS,
        rotary_dim=HIDDEN // HEADS // 4,
    )  # fmt: skip


def mistral(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """MistralForCausalLM (grouped-query attention: 2 query heads share 1 key/value head; sliding window)."""
    return _text_spec(
        "mistral", "MistralConfig", "MistralForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples,
        seed=seed, num_key_value_heads=1, **_LLAMA_SIZES,
    )  # fmt: skip


def qwen2(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """Qwen2ForCausalLM (Llama-like with q/k/v biases)."""
    return _text_spec(
        "qwen2", "Qwen2Config", "Qwen2ForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        num_key_value_heads=HEADS, **_BERT_SIZES,
    )  # fmt: skip


def qwen3(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """Qwen3ForCausalLM (Llama-like with RMSNorm on queries and keys)."""
    return _text_spec(
        "qwen3", "Qwen3Config", "Qwen3ForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        num_key_value_heads=HEADS, **_LLAMA_SIZES,
    )  # fmt: skip


def gemma(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """GemmaForCausalLM (scaled embeddings, GeGLU MLP, tied LM head)."""
    return _text_spec(
        "gemma", "GemmaConfig", "GemmaForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        num_key_value_heads=HEADS, **_LLAMA_SIZES,
    )  # fmt: skip


def phi(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """PhiForCausalLM (parallel attention + MLP, partial rotary, LM head with bias)."""
    return _text_spec(
        "phi", "PhiConfig", "PhiForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        **_BERT_SIZES,
    )  # fmt: skip


def bloom(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """BloomForCausalLM (ALiBi attention biases instead of positions; MLP is 4x hidden, not configurable)."""
    return _text_spec(
        "bloom", "BloomConfig", "BloomForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        n_layer=LAYERS, hidden_size=HIDDEN, n_head=HEADS,
    )  # fmt: skip


def falcon(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """FalconForCausalLM (multi-query attention, parallel attention + MLP)."""
    return _text_spec(
        "falcon", "FalconConfig", "FalconForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=INTERMEDIATE,
        max_position_embeddings=POSITIONS,
    )  # fmt: skip


def mpt(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """MptForCausalLM (ALiBi, no biases; the MLP width is ``expansion_ratio`` x hidden)."""
    return _text_spec(
        "mpt", "MptConfig", "MptForCausalLM", batch=batch, seq_len=seq_len, n_samples=n_samples, seed=seed,
        n_layers=LAYERS, d_model=HIDDEN, n_heads=HEADS, expansion_ratio=INTERMEDIATE // HIDDEN, max_seq_len=POSITIONS,
    )  # fmt: skip


def bart(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """BartForConditionalGeneration (encoder-decoder, shared embeddings, decoder inputs made from labels)."""
    return _text_spec(
        "bart", "BartConfig", "BartForConditionalGeneration", batch=batch, seq_len=seq_len, n_samples=n_samples,
        seed=seed, encoder_layers=LAYERS, decoder_layers=LAYERS, d_model=HIDDEN, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=INTERMEDIATE, decoder_ffn_dim=INTERMEDIATE,
        max_position_embeddings=POSITIONS,
    )  # fmt: skip


def vit(*, batch: int = 4, image_size: int = 32, n_samples: int = 256, seed: int = 0) -> ModelSpec:
    """ViTForImageClassification on (batch, 3, 32, 32) ``pixel_values`` with 8x8 patches, 2 classes, ``labels``."""
    model = _build(
        "ViTConfig", "ViTForImageClassification", seed, num_hidden_layers=LAYERS, hidden_size=HIDDEN,
        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, image_size=image_size, patch_size=8,
    )  # fmt: skip
    classes = model.config.num_labels
    # Class c's images brighten the c-th horizontal band: learnable from the pixels.
    bands = torch.stack([torch.arange(image_size) * classes // image_size == c for c in range(classes)]).float()

    def batch_of(n: int, data_seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(data_seed)
        labels = torch.randint(0, classes, (n,), generator=g)
        pixels = 0.5 * torch.randn(n, 3, image_size, image_size, generator=g) + bands[labels][:, None, :, None]
        return {"pixel_values": pixels, "labels": labels}

    def dataset() -> Samples:
        return Samples(batch_of(n_samples, seed + 2))

    return ModelSpec(model=model, kwargs=batch_of(batch, seed + 1), loss=None, dataset=dataset, name="vit")


def whisper(*, batch: int = 4, seq_len: int = SEQ_LEN, n_samples: int = 64, seed: int = 0) -> ModelSpec:
    """WhisperForConditionalGeneration: conv front end over (batch, 80, 128) log-mel ``input_features``, ``labels``."""
    model = _build(
        "WhisperConfig", "WhisperForConditionalGeneration", seed, vocab_size=VOCAB, encoder_layers=LAYERS,
        decoder_layers=LAYERS, d_model=HIDDEN, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
        encoder_ffn_dim=INTERMEDIATE, decoder_ffn_dim=INTERMEDIATE, max_source_positions=POSITIONS,
        max_target_positions=POSITIONS,
    )  # fmt: skip
    mels, frames = model.config.num_mel_bins, 2 * model.config.max_source_positions  # the encoder's fixed input size

    def batch_of(n: int, data_seed: int) -> dict[str, torch.Tensor]:
        labels = arithmetic_sequences(n, seq_len, VOCAB, seed=data_seed)  # (n, seq_len)
        g = torch.Generator().manual_seed(data_seed + 1)
        # The "audio" encodes each sequence's first label in its mean so the transcript is recoverable.
        features = torch.randn(n, mels, frames, generator=g) + (labels[:, :1, None].float() / VOCAB)
        return {"input_features": features, "labels": labels}

    def dataset() -> Samples:
        return Samples(batch_of(n_samples, seed + 2))

    return ModelSpec(model=model, kwargs=batch_of(batch, seed + 1), loss=None, dataset=dataset, name="whisper")


HF_MODELS: dict[str, Callable[..., ModelSpec]] = {
    f.__name__: f
    for f in (
        gpt2, bert, llama, t5, albert, roberta, distilbert, electra, opt, gpt_neo, gpt_neox, gptj, mistral, qwen2,
        qwen3, gemma, phi, bloom, falcon, mpt, bart, vit, whisper,
    )
}  # fmt: skip
"""Hugging Face zoo models by name; each was checked to run forward and backward with transformers 5.24."""
