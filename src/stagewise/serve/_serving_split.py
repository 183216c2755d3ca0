"""A model prepared for serving, the same way in the gateway and in every stage worker.

:func:`load_serving_split` builds the model (seeded; on the meta device when the weights come from a file) and
splits it into the chain of stages a replica runs (all stages; a task split's trunk plus one head; or one sub-model);
a worker then holds only its own stage's weights, the gateway none. :func:`describe_serving` derives the served
metadata from the capture; :func:`stage_digest` lets the gateway check that every worker of a stage built the same
weights.

Batch sizes: graphs are captured with static shapes, so a batch of ``n`` rows is padded (repeating its last row) to the
next power of two (at most ``max_batch_size``) and the outputs are cut back to ``n`` rows (:func:`bucket_rows`,
:func:`pad_rows`). That bounds the captures per worker to ``log2(max_batch_size) + 1``, each made on first use. It is
exact for models whose rows do not interact in eval mode (no cross-row ops); padded rows are never returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._spec import ModelSpec, load_model_spec
from ..split import (
    SplitModel,
    Stage,
    StagePack,
    cast_meta_params,
    input_leaves,
    params_on_meta,
    release,
    split,
    tensor_aliases,
    unflatten,
)
from ..weights import is_hf_folder
from ._backend import ModelMetadata, TensorMetadata
from ._protocol import datatype_of

logger = logging.getLogger(__name__)

__all__ = [
    "ServingSplit",
    "StageAssignment",
    "bucket_rows",
    "buckets",
    "checkpoint_model",
    "describe_serving",
    "load_serving_split",
    "load_stage_weights",
    "pad_rows",
    "stage_assignments",
    "stage_digest",
]


@dataclasses.dataclass
class ServingSplit:
    """A model split for serving, with the example call that fixes every non-batch dimension."""

    sm: SplitModel
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    name: str
    """The factory's model name."""
    chain: list[int] = dataclasses.field(default_factory=list)
    """Indices of the stages this service runs, in order (all of them; or a task split's trunk plus one head)."""
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    """Positional names a request may still use (``arg0``) -> the served input name (``x``)."""
    digests: dict[int, str] = dataclasses.field(default_factory=dict)
    """The gateway's: each chain position's weight digest as the factory built it (empty when weights come from a
    file: reading is deterministic)."""

    def chain_stages(self, stages: Sequence[Stage]) -> list[Stage]:
        return [stages[i] for i in self.chain]

    @property
    def input_names(self) -> list[str]:
        """The served inputs' names, in metadata order."""
        return list(input_leaves(self.args, self.kwargs)[1])

    @property
    def example_rows(self) -> int:
        leaves, _, _ = input_leaves(self.args, self.kwargs)
        return int(leaves[0].shape[0])

    def example_call(self, rows: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The example inputs with ``rows`` rows (example rows repeated): what a capture for that batch size needs."""
        leaves, _, spec = input_leaves(self.args, self.kwargs)
        idx = torch.arange(rows) % leaves[0].shape[0]
        args, kwargs = unflatten(spec, [t[idx] for t in leaves])
        return tuple(args), dict(kwargs)


def load_serving_split(model: str, *, stages: int, exclude_inputs: Sequence[str] = ("labels",),
                       seed: int = 0, checkpoint: str | None = None, weights: str | None = None,
                       dtype: str = "float32", cuts: Sequence[str] | None = None,
                       tasks: Sequence[str] | None = None, head: str | None = None,
                       submodule: str | None = None) -> ServingSplit:
    """Build MODEL (under ``seed``) and split it into a chain of ``stages`` stages (at ``cuts`` when given). With
    ``tasks`` and ``head``: a task split whose trunk takes ``stages - 1`` stages, followed by the stage of ``head``.

    This is the gateway's split, and it holds no weights: with ``checkpoint`` / ``weights`` / a Hugging Face folder
    MODEL the model is built on the meta device and the files are checked (headers only); from the factory it is
    built whole, each stage's weight digest is kept (:attr:`ServingSplit.digests`), and the weights are dropped.
    Workers get their stages from :func:`stage_assignments` and their weights from :func:`load_stage_weights`."""
    source = _weights_source(model, checkpoint, weights)
    if source is not None and submodule is not None:
        raise ValueError("serving one sub-model reads its inputs from a run of the whole model; give it without "
                         "--checkpoint/--weights, or serve the whole model")
    spec = _built_spec(model, seed=seed, dtype=dtype, on_meta=source is not None)
    spec.model.eval()
    if submodule is not None:
        spec = _submodule_spec(spec, submodule)
    kwargs = {k: v for k, v in spec.kwargs.items() if k not in set(exclude_inputs)}
    args, kwargs, aliases = _named_inputs(spec.model, tuple(spec.args), kwargs)
    leaves, names, _ = input_leaves(args, kwargs)
    if not leaves:
        raise ValueError(f"model {model!r} has no tensor inputs to serve")
    rows = {int(t.shape[0]) if t.dim() else 0 for t in leaves}
    if len(rows) != 1 or 0 in rows:
        raise ValueError(f"every example input of {model!r} needs the batch on dim 0 with the same size; got "
                         f"{dict(zip(names, (list(t.shape) for t in leaves)))}")
    if head is not None:
        if not tasks or head not in tasks:
            raise ValueError(f"head {head!r} is not one of the task heads {list(tasks or [])}")
        if stages < 2:
            raise ValueError("serving a task head needs at least 2 stages: the trunk and the head")
        sm = split(spec.model, args, kwargs, stages=stages - 1, tasks=list(tasks), model_name=model)
        chain = [st.index for st in sm.stages if st.spec.head is None]
        chain += [st.index for st in sm.stages if st.spec.head == head]
    else:
        sm = split(spec.model, args, kwargs, stages=stages, cuts=list(cuts) if cuts else None, model_name=model)
        if sm.partition.mode == "tasks":
            raise ValueError("a task split serves one head per model name: give the head")
        chain = [st.index for st in sm.stages]
    for pos, i in enumerate(chain):
        st = sm.stages[i]
        if st.spec.parent != (chain[pos - 1] if pos else None):
            raise ValueError(f"stage {st.index} receives from stage {st.spec.parent}; serving needs a chain")
        if st.spec.outputs and pos != len(chain) - 1:
            raise ValueError(f"stage {st.index} returns model outputs {st.spec.outputs}; serving needs them all from "
                             "the last stage")
    digests: dict[int, str] = {}
    if source is None:  # the factory may not be deterministic: its weights' digests are what every worker must match
        digests = {pos: stage_digest(sm.stages[i]) for pos, i in enumerate(chain)}
        sm.keep_only([])
    else:  # every tensor the workers will read is there with its shape (headers only) before any worker starts
        from ..weights import open_weights

        open_weights(source).verify(dict(sm.model.named_parameters()), aliases=tensor_aliases(sm.model))
    return ServingSplit(sm=sm, args=args, kwargs=kwargs, name=spec.name if head is None else
                        f"{spec.name}.{head}", chain=chain, aliases=aliases, digests=digests)


def _weights_source(model: str, checkpoint: str | None, weights: str | None) -> str | None:
    """Where the served weights are read from (a checkpoint, a weights file, the Hugging Face folder MODEL), or None:
    the factory's own."""
    return checkpoint or weights or (model if is_hf_folder(model) else None)


def _built_spec(model: str, *, seed: int, dtype: str, on_meta: bool) -> ModelSpec:
    """MODEL built under ``seed`` (parameters on the meta device when ``on_meta``), its weights in ``dtype``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with params_on_meta() if on_meta else contextlib.nullcontext():
            spec = load_model_spec(model)
    torch_dtype = getattr(torch, dtype)
    if torch_dtype != torch.float32:
        if on_meta:
            cast_meta_params(spec.model, torch_dtype)
        else:
            spec.model.to(torch_dtype)
    return spec


def load_stage_weights(assignment: StageAssignment, *, model: str, seed: int, checkpoint: str | None,
                       weights: str | None, dtype: str, submodule: str | None) -> dict[str, torch.nn.Parameter]:
    """A worker's weights, and only its own: read from the files (checkpoint, weights file, Hugging Face folder), or
    taken from the factory's model (built under ``seed``), whose other weights are then dropped."""
    names = assignment.param_names()
    expected = {n: t for pack in assignment.packs.values() for st in pack.stages.values()
                for n, t in st.module.named_parameters() if n in names}
    source = _weights_source(model, checkpoint, weights)
    if source is not None:
        from ..weights import open_weights

        files = open_weights(source)
        values = files.read(expected, aliases=assignment.aliases, dtype=getattr(torch, dtype))
        files.check_opened_only(expected, aliases=assignment.aliases, who="this serving worker")
        return {n: torch.nn.Parameter(v, requires_grad=False) for n, v in values.items()}
    built = _built_spec(model, seed=seed, dtype=dtype, on_meta=False).model
    served = built.get_submodule(submodule) if submodule is not None else built  # its weights; no forward needed
    params = dict(served.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the factory of {model!r} built no weights {missing[:5]} that the gateway's split has")
    own = {n: params[n] for n in names}
    release(served, set(names))
    return own


def _named_inputs(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, str]]:
    """Pass positional example inputs by the names ``forward`` gives them, so ``forward(self, x)`` serves input
    ``x`` (a user queries what they wrote, not ``arg0``). Returns ``(args, kwargs, aliases)``: the old positional
    names stay accepted. Inputs stay positional when ``forward``'s signature cannot name them all (``*args``,
    positional-only)."""
    if not args:
        return args, kwargs, {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())[:len(args)]
    except (TypeError, ValueError):
        return args, kwargs, {}
    if len(params) < len(args) or any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params) \
            or any(p.name in kwargs for p in params):
        return args, kwargs, {}
    named = {**{p.name: a for p, a in zip(params, args)}, **kwargs}
    old, new = input_leaves(args, kwargs)[1], input_leaves((), named)[1]
    return (), named, {o: n for o, n in zip(old, new) if o != n}


def _submodule_spec(spec: ModelSpec, fqn: str) -> ModelSpec:
    """A sub-model as a model of its own: the module at ``fqn`` with the inputs it gets in the example call."""
    try:
        module = spec.model.get_submodule(fqn)
    except AttributeError:
        names = [n for n, _ in spec.model.named_children()]
        raise ValueError(f"{type(spec.model).__name__} has no sub-module {fqn!r}; its children are {names}") from None
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    handle = module.register_forward_pre_hook(lambda _m, a, k: seen.append((a, k)) if not seen else None,
                                              with_kwargs=True)
    try:
        with torch.no_grad():
            spec.model(*spec.args, **spec.kwargs)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"sub-module {fqn!r} is never called by the model's forward on its example inputs")
    args, kwargs = seen[0]
    return ModelSpec(model=module, args=tuple(args), kwargs=dict(kwargs), name=f"{spec.name}.{fqn}")


_LIBRARY_MODEL = re.compile(r"^stagewise(\.[A-Za-z_]\w*)+:[A-Za-z_]\w*$")


def checkpoint_model(checkpoint: str, *, trust_code: bool = False) -> str:
    """The MODEL factory string a training checkpoint was made from (its manifest records the run's config).

    Importing a factory runs its code, and a checkpoint is data anyone may have written (its checksums only prove it
    is intact). So, like Hugging Face's ``trust_remote_code``, only this library's own factories (``stagewise.*``)
    are taken from a manifest unless ``trust_code``; any other must be named by the user.
    """
    from ..checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, verify="size").extra.get("config", {}).get("model")
    if not model:
        raise ValueError(f"checkpoint {checkpoint} does not record its model; pass MODEL and --checkpoint DIR")
    model = str(model)
    if not trust_code and not _LIBRARY_MODEL.match(model):
        raise ValueError(f"checkpoint {checkpoint} names its model {model!r}, and importing it would run code the "
                         f"checkpoint chose; name the model yourself: 'stagewise serve {model} --checkpoint "
                         f"{checkpoint}', or pass --trust-checkpoint-code if you trust whoever wrote the checkpoint")
    where, _, attr = model.rpartition(":")
    if where.endswith(".py") and not Path(where).is_file():
        raise ValueError(f"checkpoint {checkpoint} names its model {model!r} (from its manifest), but {where!r} does "
                         f"not exist here; name the model yourself: 'stagewise serve PATH/TO/FILE.py:{attr} "
                         f"--checkpoint {checkpoint}'")
    logger.info("model %s (from the manifest of checkpoint %s)", model, checkpoint)
    return model


@dataclasses.dataclass
class StageAssignment:
    """What one chain position's worker runs, as data: its stage captured for every batch-size bucket, without
    weights (the gateway captured them all, once; the worker captures nothing), and where its weights come from."""

    packs: dict[int, StagePack]
    """Bucket rows -> this position's stage for batches of that many rows (parameters on the meta device)."""
    next_recv: dict[int, list[str]]
    """Bucket rows -> names of the values the next stage receives, in its order (empty for the last stage)."""
    forwarded: list[str]
    """Model inputs this stage or a later one reads (what it receives with the activations), in metadata order."""
    forwarded_next: list[str]
    """Model inputs a later stage reads (what it passes on)."""
    aliases: dict[str, list[str]]
    """Other names of this stage's tied weights (a weights file may hold a tied weight under any of them)."""

    def param_names(self) -> list[str]:
        return next(iter(self.packs.values())).param_names()

    def fill(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        for pack in self.packs.values():  # one set of weights shared by every bucket's graph
            pack.fill(params)


def buckets(max_batch_size: int) -> list[int]:
    """The batch sizes a worker runs: powers of two below ``max_batch_size``, and ``max_batch_size``."""
    return sorted({bucket_rows(rows, max_batch_size) for rows in range(1, max_batch_size + 1)})


def stage_assignments(serving: ServingSplit, max_batch_size: int) -> list[StageAssignment]:
    """Every chain position's :class:`StageAssignment` (the gateway captures each bucket once, for all workers)."""
    sm = serving.sm
    default = serving.chain_stages(sm.stages)
    names = serving.input_names
    aliases = tensor_aliases(sm.model)
    out = [StageAssignment(packs={}, next_recv={}, aliases={},
                           forwarded=[n for n in names if any(n in st.spec.inputs for st in default[pos:])],
                           forwarded_next=[n for n in names if any(n in st.spec.inputs for st in default[pos + 1:])])
           for pos in range(len(serving.chain))]
    for rows in buckets(max_batch_size):
        args, kwargs = serving.example_call(rows)
        chain = serving.chain_stages(sm.stages_for(args, kwargs)[1])
        for pos, index in enumerate(serving.chain):
            a = out[pos]
            a.packs[rows] = sm.pack([index], args, kwargs)
            a.next_recv[rows] = [v.name for v in chain[pos + 1].spec.recv] if pos + 1 < len(chain) else []
            a.aliases.update({f: aliases.get(f, []) for f in a.packs[rows].param_names()})
    return out


def describe_serving(serving: ServingSplit, name: str) -> ModelMetadata:
    """Metadata: inputs and outputs by leaf name, dtypes and shapes read from the capture (no weights needed)."""
    leaves, names, _ = input_leaves(serving.args, serving.kwargs)
    example = dict(zip(names, leaves))
    cap, stages = serving.sm.stages_for(serving.args, serving.kwargs)
    rows = serving.example_rows
    out_meta = []
    served = set(serving.chain_stages(stages)[-1].spec.outputs)
    for i, leaf_name in enumerate(cap.output_names):
        if leaf_name not in served:  # another task head's output
            continue
        node = cap.output_nodes[i]
        value = example[cap.output_inputs[i]] if node is None else node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"model output {leaf_name!r} is {shape}: every served output needs the batch on dim 0 "
                             f"({rows} rows for the example inputs); drop loss-only inputs with exclude_inputs")
        out_meta.append(TensorMetadata(name=leaf_name, datatype=datatype_of(value),
                                       shape=(-1, *(int(d) for d in value.shape[1:]))))
    return ModelMetadata(
        name=name, outputs=tuple(out_meta), aliases=dict(serving.aliases),
        inputs=tuple(TensorMetadata(name=n, datatype=datatype_of(t), shape=(-1, *t.shape[1:]))
                     for n, t in example.items()))


def bucket_rows(rows: int, max_batch_size: int) -> int:
    """The captured batch size that serves ``rows`` rows: the next power of two, at most ``max_batch_size``."""
    assert 0 < rows <= max_batch_size, (rows, max_batch_size)
    return min(1 << (rows - 1).bit_length(), max_batch_size)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with its last row repeated up to ``rows`` rows."""
    extra = rows - t.shape[0]
    if extra <= 0:
        return t
    return torch.cat([t, t[-1:].expand(extra, *t.shape[1:])], dim=0)


def stage_digest(stage: Stage) -> str:
    """SHA-256 over the weights the stage owns and its constants (names, dtypes, shapes, bytes), to check that every
    process built the same ones."""
    h = hashlib.sha256()
    owned = set(stage.spec.params)
    state = dict(stage.module.named_parameters(remove_duplicate=False))
    state.update(dict(stage.module.named_buffers(remove_duplicate=False)))
    for name in sorted(n for n in state if n in owned or n.startswith("_stagewise_const")):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(state[name].shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
