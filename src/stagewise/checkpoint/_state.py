"""Training state that is not weights, in layout-free form: optimizer state keyed by FQN, RNG states as JSON.

A torch optimizer's ``state_dict()`` numbers parameters by their position in its param groups, which changes with the
pipeline layout. Here every entry is keyed by the parameter's FQN in the original model instead, so a rank of any
later layout can pick out the entries of the parameters it now owns. Tensors (``exp_avg``, ``step``...) go to
safetensors; everything else (hyper-parameters, non-tensor state) is JSON.
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["load_optimizer_state", "optimizer_state_by_fqn", "restore_rng_state", "rng_state_json", "tied_groups"]

log = logging.getLogger(__name__)


def _json_value(value: Any, where: str) -> Any:
    """A hyper-parameter or state value as JSON: numbers, strings, None, lists; small tensors as tagged lists."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() <= 16:
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    raise ValueError(f"{where} is a {type(value).__name__}, which a checkpoint cannot store as JSON; "
                     "make it a number, string, bool, None or a list of those")


def _from_json(value: Any, like: Any = None) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, list):
        items = [_from_json(v) for v in value]
        return tuple(items) if isinstance(like, tuple) else items
    return value


def _fqn_by_identity(named_params: Iterable[tuple[str, torch.Tensor]]) -> dict[int, str]:
    out: dict[int, str] = {}
    for fqn, p in named_params:
        out.setdefault(id(p), fqn)  # a tied parameter listed twice keeps its first name
    return out


def optimizer_state_by_fqn(
    optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, torch.Tensor]]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Split ``optimizer``'s state into ``({fqn: {name: tensor}}, meta_json)`` keyed by the parameters' FQNs.

    ``named_params`` gives each of the optimizer's parameters its FQN in the original model (e.g. the stage module's
    ``named_parameters()``); parameters are matched by identity, so its order does not matter. ``meta_json`` holds
    the optimizer class, the param groups (hyper-parameters plus ``"params"``: FQNs) and non-tensor state values.
    The tensors are the optimizer's own (not copies): save them before the next ``step()``.
    """
    fqn_of = _fqn_by_identity(named_params)
    sd = optimizer.state_dict()
    index_to_fqn: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    for g, (live, saved) in enumerate(zip(optimizer.param_groups, sd["param_groups"])):
        names = []
        for p, index in zip(live["params"], saved["params"]):
            fqn = fqn_of.get(id(p))
            if fqn is None:
                raise ValueError(f"param group {g} of the optimizer holds a parameter of shape {tuple(p.shape)} that "
                                 "is not in named_params; pass every parameter the optimizer updates with its FQN")
            index_to_fqn[index] = fqn
            names.append(fqn)
        hyper = {k: _json_value(v, f"param group {g} setting {k!r}") for k, v in saved.items() if k != "params"}
        groups.append({**hyper, "params": names})
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        fqn = index_to_fqn[index]
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(fqn, {})[name] = value.detach()
            else:
                scalars.setdefault(fqn, {})[name] = _json_value(value, f"optimizer state {fqn}::{name}")
    meta = {"optimizer": type(optimizer).__name__, "param_groups": groups, "state": scalars}
    return tensors, meta


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Iterable[tuple[str, torch.Tensor]],
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    meta_json: Mapping[str, Any],
) -> None:
    """Load FQN-keyed optimizer state (from :func:`optimizer_state_by_fqn` or ``Checkpoint.optimizer_state``).

    The optimizer may hold any subset of the saved parameters in any grouping (a new pipeline layout): each of its
    parameters takes its saved state and its saved group's hyper-parameters (learning rate included, as
    ``Optimizer.load_state_dict`` does). A parameter with no saved state starts fresh. Build the LR scheduler
    *before* calling this (constructing a scheduler resets each group's learning rate), then load its state.
    """
    saved_cls = meta_json.get("optimizer")
    if saved_cls is not None and saved_cls != type(optimizer).__name__:
        raise ValueError(f"the checkpoint holds {saved_cls} state but the optimizer is {type(optimizer).__name__}; "
                         "build the same optimizer class the run was saved with")
    fqn_of = _fqn_by_identity(named_params)
    group_of: dict[str, dict[str, Any]] = {}
    for group in meta_json.get("param_groups", []):
        for fqn in group["params"]:
            group_of[fqn] = group
    scalars: Mapping[str, Mapping[str, Any]] = meta_json.get("state", {})
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    index = 0
    for g, live in enumerate(optimizer.param_groups):
        saved_group: dict[str, Any] | None = None
        ids = []
        for p in live["params"]:
            fqn = fqn_of.get(id(p))
            if fqn is None:
                raise ValueError(f"param group {g} of the optimizer holds a parameter of shape {tuple(p.shape)} that "
                                 "is not in named_params; pass every parameter the optimizer updates with its FQN")
            found = group_of.get(fqn)
            if found is None:
                raise ValueError(f"the checkpoint has no optimizer param group holding {fqn!r}; was it saved by a "
                                 "run of the same model?")
            if saved_group is None:
                saved_group = found
            elif _hyper(found) != _hyper(saved_group):
                raise ValueError(f"param group {g} mixes parameters that were saved with different hyper-parameters "
                                 f"({fqn!r} differs from {_first_name(g, optimizer, fqn_of)!r}); group them as saved")
            entry: dict[str, Any] = {k: _from_json(v) for k, v in scalars.get(fqn, {}).items()}
            for name, t in tensors.get(fqn, {}).items():
                if t.dim() > 0 and t.shape != p.shape:
                    raise ValueError(f"optimizer state {fqn}::{name} has shape {tuple(t.shape)} but the parameter "
                                     f"has shape {tuple(p.shape)}; the checkpoint is of a different model")
                entry[name] = t
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        hyper = {k: _from_json(v, live.get(k)) for k, v in _hyper(saved_group or {}).items()}
        groups.append({**live, **hyper, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _first_name(g: int, optimizer: torch.optim.Optimizer, fqn_of: Mapping[int, str]) -> str:
    return fqn_of.get(id(optimizer.param_groups[g]["params"][0]), "?")


# --- RNG ----------------------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state_json() -> dict[str, Any]:
    """This process's random-number-generator states as JSON: Python ``random``, numpy, torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch_cpu": _b64(torch.get_rng_state()),
        "torch_cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back RNG states saved by :func:`rng_state_json` (a missing entry leaves that generator alone)."""
    if state.get("python"):
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if state.get("numpy"):
        n = state["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if state.get("torch_cpu"):
        torch.set_rng_state(_unb64(state["torch_cpu"]))
    cuda = state.get("torch_cuda")
    if cuda:
        if not torch.cuda.is_available():
            log.warning("the checkpoint holds CUDA RNG states but CUDA is not available here; not restoring them")
        else:
            count = torch.cuda.device_count()
            if len(cuda) != count:
                log.warning("the checkpoint holds %d CUDA RNG states but this process sees %d devices; restoring the "
                            "first %d", len(cuda), count, min(len(cuda), count))
            for device, text in enumerate(cuda[:count]):
                torch.cuda.set_rng_state(_unb64(text), device)


# --- tied weights -------------------------------------------------------------------------------------------------


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one tensor in ``model.state_dict()`` (e.g. ``[["wte.weight", "lm_head.weight"]]``)."""
    keys = set(model.state_dict())
    by_id: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if name in keys and name not in by_id.setdefault(id(t), []):
            by_id[id(t)].append(name)
    return [names for names in by_id.values() if len(names) > 1]
