"""``hf_folder_spec``: a Hugging Face model folder as a ``ModelSpec`` (the model built from ``config.json``).

The model has random weights (seeded, so every process builds the same ones); whoever builds it decides whether to
build it on the meta device and read the folder's weights per stage (:func:`open_weights`). Its inputs and training
data are token sequences a causal LM can learn (``labels`` = ``input_ids``, so ``output.loss`` is the loss), as the
zoo's Hugging Face models have. ``transformers`` is imported only when it is called.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from .._spec import ModelSpec
from ..zoo.basic import Samples, seeded
from ..zoo.gpt import arithmetic_sequences
from ._errors import WeightsError

__all__ = ["hf_folder_spec"]

SEED = 0


def hf_folder_spec(folder: str | Path, *, batch: int = 4, seq: int = 16, samples: int = 256) -> ModelSpec:
    """``AutoModelForCausalLM.from_config`` of ``folder/config.json``, fed ``input_ids`` (batch, seq) within the
    vocabulary, an all-ones ``attention_mask`` and ``labels``; the dataset has ``samples`` such sequences."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} has no config.json; a Hugging Face model folder is what save_pretrained writes")
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    with seeded(SEED):
        model = tf.AutoModelForCausalLM.from_config(config)
    vocab = model.get_input_embeddings().num_embeddings

    def batch_of(n: int, seed: int) -> dict[str, torch.Tensor]:
        ids = arithmetic_sequences(n, seq, vocab, seed=seed)  # (n, seq) int64
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return ModelSpec(model=model, kwargs=batch_of(batch, SEED + 1), loss=None,
                     dataset=lambda: Samples(batch_of(samples, SEED + 2)), name=folder.resolve().name)


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise ImportError("a Hugging Face model folder as MODEL needs transformers: pip install transformers") from exc
