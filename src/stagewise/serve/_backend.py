"""What the gateway serves: the signature a backend declares (:class:`ModelMetadata`, checked by
:func:`validate_inputs`), the :class:`InferenceBackend` interface and :class:`LocalBackend` (an in-process module).

A backend runs ONE batch at a time per call: inputs arrive already concatenated along dim 0 and validated against
``metadata()``; it returns every output of ``metadata().outputs`` with the same number of rows. The batcher checks that
contract after each call. Pipeline backends (stages in other processes) implement the same interface.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._protocol import DATATYPES, BadRequestError, InferRequest, TensorValue, datatype_of

if TYPE_CHECKING:
    from ._metrics import GatewayMetrics

__all__ = [
    "InferenceBackend",
    "LocalBackend",
    "ModelError",
    "ModelMetadata",
    "TensorMetadata",
    "VersionedOutputs",
    "numeric_tensor",
    "validate_inputs",
]

logger = logging.getLogger(__name__)


class ModelError(BadRequestError):
    """The model itself raised on a request's inputs (an embedding id out of range...): a 400 naming the exception, as
    Triton answers, not a 500: the service is fine, the input is not. The batcher re-runs a failing batch of several
    requests one by one, so only the request that causes it gets this answer."""

    def __init__(self, model: str, error: str, message: str, *, where: str = "") -> None:
        super().__init__(f"model {model!r} raised {error}: {message}" + (f" ({where})" if where else ""))
        self.error = error


@dataclasses.dataclass(kw_only=True, frozen=True)
class TensorMetadata:
    """One input or output of a model, as ``GET /v2/models/{name}`` reports it."""

    name: str
    """Tensor name used in requests and responses."""
    datatype: str
    """v2 datatype name, one of :data:`DATATYPES`."""
    shape: tuple[int, ...]
    """Shape with ``-1`` for the batch dimension (dim 0) and any other variable dimension."""

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name!r}: datatype {self.datatype!r} is not one of {sorted(DATATYPES)}")
        if not self.shape or self.shape[0] != -1:
            raise ValueError(f"tensor {self.name!r}: shape {list(self.shape)} must start with the batch dim -1")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclasses.dataclass(kw_only=True, frozen=True)
class ModelMetadata:
    """What a backend serves: its name, versions and tensor signature."""

    name: str
    """Model name in the URL ``/v2/models/{name}``."""
    inputs: tuple[TensorMetadata, ...]
    """Inputs in the order binary data is expected."""
    outputs: tuple[TensorMetadata, ...]
    """Outputs in the order they are returned when a request names none."""
    versions: tuple[str, ...] = ("1",)
    """Versions reachable through ``/versions/{v}``."""
    platform: str = "pytorch"
    """Free-form framework tag."""
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Other names a request may give an input by (``arg0`` for ``x``: the position of ``forward``'s parameter)."""

    def __post_init__(self) -> None:
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [t.name for t in tensors]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"model {self.name!r}: {kind} must be non-empty with unique names, got {names}")
        inputs = {t.name for t in self.inputs}
        bad = {a: n for a, n in self.aliases.items() if n not in inputs or a in inputs}
        if bad:
            raise ValueError(f"model {self.name!r}: aliases {bad} must name inputs and not shadow one")
        if not self.versions:
            raise ValueError(f"model {self.name!r}: versions must name at least one version")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "versions": list(self.versions), "platform": self.platform,
                "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}


def validate_inputs(request: InferRequest, meta: ModelMetadata) -> dict[str, TensorValue]:
    """Check the request against the model's signature; return ``name -> value`` in the model's input order."""
    given: dict[str, Any] = {}
    for x in request.inputs:
        name = meta.aliases.get(x.name, x.name)
        if name in given:
            raise BadRequestError(f"input {name!r} is given twice (as {given[name].name!r} and {x.name!r})")
        given[name] = x
    expected = [t.name for t in meta.inputs]
    unknown = [n for n in given if n not in expected]
    if unknown:
        raise BadRequestError(f"unknown input {unknown[0]!r} for model {meta.name!r}; it expects {expected}")
    missing = [n for n in expected if n not in given]
    if missing:
        raise BadRequestError(f"missing input {missing[0]!r} for model {meta.name!r}; it expects {expected}")
    rows: int | None = None
    for spec in meta.inputs:
        x = given[spec.name]
        if x.datatype != spec.datatype:
            raise BadRequestError(f"input {spec.name!r} has datatype {x.datatype} but model {meta.name!r} expects "
                                  f"{spec.datatype}")
        if len(x.shape) != len(spec.shape) or any(e != -1 and e != d for d, e in zip(x.shape, spec.shape)):
            raise BadRequestError(f"input {spec.name!r} has shape {x.shape} but model {meta.name!r} expects "
                                  f"{list(spec.shape)} (-1 = any size)")
        if rows is not None and x.shape[0] != rows:
            raise BadRequestError(f"input {spec.name!r} has {x.shape[0]} rows (dim 0) but other inputs have {rows}")
        rows = x.shape[0]
    if rows == 0:
        raise BadRequestError("inputs have 0 rows (dim 0); send at least one")
    names = [t.name for t in meta.outputs]
    for out in request.outputs or []:
        if out.name not in names:
            raise BadRequestError(f"unknown output {out.name!r} requested from model {meta.name!r}; it has {names}")
    return {spec.name: given[spec.name].value for spec in meta.inputs}


class VersionedOutputs(dict):  # type: ignore[type-arg]
    """A backend's outputs (``name -> tensor``) with the model version that computed them (``model_version`` in the
    answer); a plain dict answers with the version the request named, else the metadata's first."""

    def __init__(self, outputs: Mapping[str, Any], *, version: str | None) -> None:
        super().__init__(outputs)
        self.version = version


class InferenceBackend(abc.ABC):
    """A model the gateway can serve.

    Subclasses set ``name`` and ``max_batch_size`` (attributes or properties) and implement :meth:`metadata`,
    :meth:`ready` and :meth:`infer`. ``metadata().versions`` lists the versions reachable under ``/versions/{v}``.
    """

    name: str
    """Model name in ``/v2/models/{name}``."""
    max_batch_size: int
    """Most rows one :meth:`infer` call accepts; the batcher never sends more."""

    @abc.abstractmethod
    def metadata(self) -> ModelMetadata:
        """Inputs and outputs (name, v2 datatype, shape with -1 for the batch dim)."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """True when :meth:`infer` can be called now."""

    @abc.abstractmethod
    async def infer(self, inputs: Mapping[str, TensorValue]) -> Mapping[str, TensorValue]:
        """Run one batch (inputs concatenated along dim 0) and return every output, batched the same way."""

    def bind_metrics(self, metrics: GatewayMetrics) -> None:  # noqa: B027 - optional hook, no-op by default
        """Called once by the gateway; pipeline backends keep ``metrics`` to call ``observe_stage_time``."""

    async def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release resources; called when the gateway shuts down."""

    # The model repository extension (``/v2/repository/...``): a backend that can take new weights while it serves
    # overrides these three.
    def repository_index(self) -> list[dict[str, str]]:
        """This model's entries of ``POST /v2/repository/index``: ``{name, version, state, reason}`` each."""
        state = "READY" if self.ready() else "UNAVAILABLE"
        return [{"name": self.name, "version": v, "state": state, "reason": ""} for v in self.metadata().versions]

    async def load_version(self, *, checkpoint: str | None = None, version: str | None = None,
                           verify: str = "sha256") -> str:
        """Serve the weights of ``checkpoint`` (or of the known ``version``) from now on; returns the version.
        ``verify``: ``sha256`` (hash every file read) or ``size``."""
        raise BadRequestError(f"model {self.name!r} ({type(self).__name__}) cannot load weights while it serves; "
                              "serve it with 'stagewise serve' (a PipelineBackend) to load checkpoints at run time")

    async def unload(self) -> None:
        """Stop serving this model (its ``/load`` brings it back)."""
        raise BadRequestError(f"model {self.name!r} ({type(self).__name__}) cannot be unloaded while it serves")


def numeric_tensor(name: str, value: TensorValue, *, served_by: str) -> torch.Tensor:
    """Input ``name`` as a tensor for a backend that runs numeric models only (``served_by`` names it in the error)."""
    if isinstance(value, torch.Tensor):
        return value
    if value.dtype.kind in "OSU":
        raise BadRequestError(f"input {name!r} is BYTES; {served_by} runs models on numeric tensors only")
    array = np.ascontiguousarray(value)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _named_outputs(out: Any, names: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Name a model's output: a tensor, a tuple/list of tensors, or a dict/ModelOutput of tensors."""
    if isinstance(out, torch.Tensor):
        out = (out,)
    if isinstance(out, Mapping):
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        if names is None:
            return tensors
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"output_names {missing} are not tensor outputs of the model (it returns "
                             f"{sorted(tensors)})")
        return {n: tensors[n] for n in names}
    if isinstance(out, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in out):
        keys = list(names) if names is not None else [f"output_{i}" for i in range(len(out))]
        if len(keys) != len(out):
            raise ValueError(f"output_names has {len(keys)} names but the model returns {len(out)} tensors")
        return dict(zip(keys, out))
    raise ValueError(f"LocalBackend needs a model returning a tensor, a tuple of tensors or a dict of tensors; got "
                     f"{type(out).__name__}")


class LocalBackend(InferenceBackend):
    """Runs an ``nn.Module`` in this process, in a worker thread, under ``torch.inference_mode`` and ``eval()``.

    ``example_inputs`` is a tensor, a tuple of positional tensors or a dict of keyword tensors, each with the batch on
    dim 0; the model runs once on them at construction to derive the output signature. Input names default to the
    dict keys, else to the names of ``forward``'s positional parameters (``input_0``... when those are not usable).
    Output names default to the dict keys, else ``output_0``... Inputs are moved to the device of the model's first
    parameter; outputs come back on the CPU.
    """

    def __init__(self, model: nn.Module, *, name: str, example_inputs: Any, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, max_batch_size: int = 64, max_workers: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LocalBackend needs a torch.nn.Module, got {type(model).__name__}")
        if not name or "/" in name:
            raise ValueError(f"LocalBackend name must be a non-empty string without '/', got {name!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.name, self.max_batch_size, self.model = name, max_batch_size, model.eval()
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        self._keyword = isinstance(example_inputs, Mapping)
        examples = list(example_inputs.values()) if self._keyword else list(example_inputs)
        if not examples or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in examples):
            raise ValueError("example_inputs must be tensors with a batch dim (dim 0): a tensor, tuple or dict")
        if input_names is None:
            input_names = list(example_inputs) if self._keyword else self._positional_names(model, len(examples))
        if len(input_names) != len(examples) or len(set(input_names)) != len(input_names):
            raise ValueError(f"input_names {list(input_names)} must be {len(examples)} distinct names, one per example")
        self.input_names = list(input_names)
        self._arg_names = list(example_inputs) if self._keyword else self.input_names
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers,
                                                               thread_name_prefix=f"stagewise-{name}")
        example = dict(zip(self.input_names, examples))
        outputs = _named_outputs(self._forward(example), output_names)
        rows = examples[0].shape[0]
        for key, t in outputs.items():
            if t.dim() == 0 or t.shape[0] != rows:
                raise ValueError(f"output {key!r} has shape {list(t.shape)}: every output needs the batch dim first "
                                 f"({rows} rows for the example inputs)")
        self.output_names = list(outputs)
        self._meta = ModelMetadata(
            name=name,
            inputs=tuple(TensorMetadata(name=n, datatype=datatype_of(t), shape=(-1, *t.shape[1:]))
                         for n, t in example.items()),
            outputs=tuple(TensorMetadata(name=n, datatype=datatype_of(t), shape=(-1, *t.shape[1:]))
                          for n, t in outputs.items()),
        )
        self._closed = False

    @staticmethod
    def _positional_names(model: nn.Module, count: int) -> list[str]:
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in params if p.kind in kinds][:count]
        return names if len(names) == count else [f"input_{i}" for i in range(count)]

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _forward(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        device = self._device()
        with torch.inference_mode():
            values = [inputs[n].to(device) for n in self.input_names]
            if self._keyword:
                return self.model(**dict(zip(self._arg_names, values)))
            return self.model(*values)

    def _run(self, inputs: Mapping[str, TensorValue]) -> dict[str, torch.Tensor]:
        tensors = {n: numeric_tensor(n, inputs[n], served_by="LocalBackend") for n in self.input_names}
        try:
            out = self._forward(tensors)
        except Exception as exc:  # noqa: BLE001 - the model's own exception: this input's fault, a 400
            raise ModelError(self.name, type(exc).__name__, str(exc)) from exc
        outputs = _named_outputs(out, self.output_names)
        return {k: v.detach().cpu() for k, v in outputs.items()}

    def metadata(self) -> ModelMetadata:
        return self._meta

    def ready(self) -> bool:
        return not self._closed

    async def infer(self, inputs: Mapping[str, TensorValue]) -> dict[str, torch.Tensor]:
        if self._closed:
            raise RuntimeError(f"LocalBackend {self.name!r} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, dict(inputs))

    async def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
