"""The language model and tokenizer a generation service serves: built the same way in the gateway and every worker.

MODEL is a Hugging Face folder (``config.json`` + weights, read by ``transformers``) or a factory
(``package.module:factory``, called under the configured seed, so every process builds the same weights). The
tokenizer is a ``tokenizer.json`` (the ``tokenizers`` package), from the folder or named on its own; the chat template
is the folder's ``tokenizer_config.json`` ``chat_template`` (rendered with jinja2, as ``transformers`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import StagewiseError
from ._serving_split import _built_spec as built_spec  # the one way a factory is built for serving

__all__ = ["ChatTemplate", "TokenizerMissingError", "eos_token_ids", "load_causal_lm", "load_tokenizer",
           "max_positions"]


class TokenizerMissingError(StagewiseError, FileNotFoundError):
    """Text was asked for, and the model has no tokenizer.json (give one with GenerateConfig.tokenizer)."""


def _is_folder(model: str) -> bool:
    return (Path(model) / "config.json").is_file()


def load_causal_lm(model: str, *, seed: int, dtype: str) -> nn.Module:
    """MODEL's causal LM in eval mode, with its weights in ``dtype``."""
    if _is_folder(model):
        import transformers

        lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    else:
        lm = built_spec(model, seed=seed, dtype=dtype, on_meta=False).model
    return lm.eval()


def eos_token_ids(lm: nn.Module) -> tuple[int, ...]:
    """The ids that end a sequence, as ``generate`` reads them (generation config first, then the model config)."""
    for source in (getattr(lm, "generation_config", None), getattr(lm, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ()


def max_positions(lm: nn.Module, cap: int = 4096) -> int:
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def load_tokenizer(model: str, tokenizer: str | None) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer`` (file or folder) or MODEL's folder; None when there is none."""
    where = tokenizer or (model if _is_folder(model) else None)
    if where is None:
        return None
    path = Path(where)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        if tokenizer is not None:
            raise TokenizerMissingError(f"no tokenizer at {path} (GenerateConfig.tokenizer)")
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


class ChatTemplate:
    """Renders chat messages into a prompt: the folder's Jinja ``chat_template``, or a plain 'role: content' form."""

    def __init__(self, model: str, tokenizer: str | None) -> None:
        self.template: Any = None
        self.special: dict[str, Any] = {}
        folder = Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else Path(model)
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            source = config.get("chat_template")
            if isinstance(source, str):
                import jinja2

                env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
                self.template = env.from_string(source)
                self.special = {k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)}

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.template is not None:
            return str(self.template.render(messages=messages, add_generation_prompt=True, **self.special))
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
