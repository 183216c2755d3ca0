"""Single-process training on exactly the data and updates a distributed run uses: the yardstick for exactness."""

from __future__ import annotations

from typing import Any

import torch

from .._spec import training_data
from ..split import materialise, tensor_aliases
from ._config import TrainConfig
from ._data import global_batches, sample_to_call
from ._device import resolve_device, strict_fp32, to_device
from ._rank import builds_on_meta, load_train_spec, make_optimizer, model_loss, train_dtype, weights_reader

__all__ = ["train_reference"]


def train_reference(config: TrainConfig) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train ``config.model`` in this process on the same global batches; returns (losses, final state dict).

    With ``config.runtime.device`` cuda the model trains on the current GPU in true fp32 (TF32 off, as in the
    workers); the returned state dict is always on the CPU.
    """
    torch.manual_seed(config.data.seed)
    spec = load_train_spec(config)
    model = spec.model.train(config.split.dropout)
    if builds_on_meta(config):  # every weight made exactly as the ranks make theirs (seeded, or read from a file)
        names = [fqn for fqn, p in model.named_parameters() if p.is_meta]
        read = weights_reader(config)
        aliases = tensor_aliases(model)
        values = None if read is None else read(dict(model.named_parameters()), aliases)
        materialise(model, names, values=values, seed=config.data.seed, dtype=train_dtype(config))
    device = torch.device("cpu")
    if resolve_device(config.runtime.device) == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        strict_fp32(device)
        model.to(device)
    data = training_data(spec, limit=config.samples_read)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(config, params)
    losses: list[float] = []
    for indices in global_batches(len(data), global_batch=config.data.global_batch, steps=config.steps,
                                  seed=config.data.seed, shuffle=config.data.shuffle):
        inputs, targets = torch.utils.data.default_collate([data[i] for i in indices])
        if device.type != "cpu":
            inputs, targets = to_device(inputs, device), to_device(targets, device)
        args, kwargs = sample_to_call(inputs)
        loss = model_loss(spec, model(*args, **kwargs), targets)
        loss.backward()
        if config.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.optim.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    state: dict[str, Any] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return losses, state
