"""Weights read per stage from the files users keep, by the model's FQNs.

A process that builds only its own stages asks for its own tensors and gets them from whichever files hold them,
opening only those files (memory-mapped, one tensor at a time), so no process ever holds a whole model::

    source = open_weights("path/to/hf-folder")      # or a checkpoint directory, a .safetensors or a state_dict file
    source.check_covers(model.state_dict(), aliases={"lm_head.weight": ["transformer.wte.weight"]})
    stage.load_state_dict(source.read(stage.state_dict(), dtype=torch.bfloat16))

Accepted: a Stagewise checkpoint directory (or the directory holding them: the ``latest`` one), a Hugging Face model
folder (``config.json`` plus ``model.safetensors``, a sharded ``model.safetensors.index.json``, ``pytorch_model.bin``
or ``pytorch_model.bin.index.json``), a ``.safetensors`` file, an ``*.index.json`` file, or a ``torch.save``'d
state_dict (``.pt``, ``.pth``, ``.bin``; read with ``torch.load(weights_only=True, mmap=True)``, never unpickled).
Names in the files may differ from the model's the way Hugging Face's do (a base prefix such as ``transformer.``
present or absent, legacy LayerNorm ``gamma``/``beta``); :meth:`WeightSource.read` finds them.
"""

from .._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "WeightSource": "._source",
    "WeightsError": "._errors",
    "hf_folder_spec": "._hf_spec",
    "is_hf_folder": "._open",
    "open_weights": "._open",
})
