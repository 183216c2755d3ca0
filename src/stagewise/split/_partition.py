"""The Partition: plain data describing units, cuts and what crosses each stage boundary. Round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["CAPTURE_METHODS", "COST_METHODS", "SPLIT_MODES", "Partition", "StageSpec", "UnitInfo", "ValueSpec"]

SPLIT_MODES = ("layers", "submodels", "tasks")
COST_METHODS = ("uniform", "params", "time")
CAPTURE_METHODS = ("graph", "modules")


@dataclasses.dataclass(kw_only=True)
class ValueSpec:
    """A value that crosses a stage boundary."""

    name: str
    """Graph value name (an op's name such as ``linear_3``, or a parameter FQN when a tied weight crosses)."""
    shape: list[int]
    """Static shape for the captured input signature."""
    dtype: str
    """torch dtype without the ``torch.`` prefix, e.g. ``float32``, ``int64``, ``bool``."""
    kind: str = "activation"
    """``activation`` or ``parameter`` (a weight used by a later stage too; its gradient flows back to the owner)."""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * getattr(torch, self.dtype).itemsize


@dataclasses.dataclass(kw_only=True)
class StageSpec:
    """One stage: which units it runs, which weights it owns, what it receives, reads and sends."""

    index: int
    units: list[str]
    """Unit names (module FQNs, ``fqn@k`` for the k-th extra call of a shared module), in execution order."""
    parent: int | None
    """The stage this one receives from (None for the first stage)."""
    params: list[str]
    """FQNs of the parameters and buffers this stage owns (each lives in exactly one stage)."""
    recv: list[ValueSpec]
    """Values received from ``parent``, in order."""
    inputs: list[str]
    """Model input leaves this stage reads directly (``input_ids``, ``attention_mask``, ``arg0``...)."""
    send: list[ValueSpec]
    """Values this stage produces or passes through for its children (each child takes the subset in its recv)."""
    outputs: list[str]
    """Model output leaves returned by this stage (only stages without children return outputs)."""
    head: str | None = None
    """For a task split: the task head this stage runs."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageSpec:
        data = dict(data)
        data["recv"] = [ValueSpec(**v) for v in data["recv"]]
        data["send"] = [ValueSpec(**v) for v in data["send"]]
        return cls(**data)


@dataclasses.dataclass(kw_only=True)
class UnitInfo:
    """Profile of one unit (one module call)."""

    name: str
    params: int = 0
    """Number of parameter elements owned by this unit (a weight used by several units counts at its first use)."""
    param_bytes: int = 0
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    out_bytes: int = 0
    """Bytes of activations crossing a cut placed right after this unit (0 after the last unit)."""


@dataclasses.dataclass(kw_only=True)
class Partition:
    """Units, cut points and stage specs of a split model."""

    mode: str
    """``layers``, ``submodels`` or ``tasks``."""
    by: str
    """Cost used to place the cuts: ``uniform``, ``params``, ``time`` or ``cuts`` (listed by the user)."""
    units: list[UnitInfo]
    starts: list[int]
    """Index of the first unit of every stage (chain part; task heads are listed in ``heads``)."""
    stages: list[StageSpec]
    heads: list[str] = dataclasses.field(default_factory=list)
    """Task split: the head module FQNs, one extra stage each after the trunk stages."""
    submodels: list[str] = dataclasses.field(default_factory=list)
    """Sub-model split: the FQNs that became their own units."""
    model: str | None = None
    """The ``MODEL`` string the partition was made from, when known."""
    input_names: list[str] = dataclasses.field(default_factory=list)
    output_names: list[str] = dataclasses.field(default_factory=list)
    training: bool = True
    """Whether the model was captured in training mode (dropout, batch-norm statistics)."""
    capture: str = "graph"
    """How the units were found: ``graph`` (torch.export; units are module calls inside the captured graph) or
    ``modules`` (fallback for forwards export cannot capture: a plain chain of module calls recorded with hooks)."""

    def __post_init__(self) -> None:
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"Partition.mode must be one of {SPLIT_MODES}, got {self.mode!r}")
        if self.capture not in CAPTURE_METHODS:
            raise ValueError(f"Partition.capture must be one of {CAPTURE_METHODS}, got {self.capture!r}")

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def stage_of_unit(self) -> dict[str, int]:
        return {unit: stage.index for stage in self.stages for unit in stage.units}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. runs/gpt2.json on a fresh checkout
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        data = dict(data)
        data["units"] = [UnitInfo(**u) for u in data["units"]]
        data["stages"] = [StageSpec.from_dict(s) for s in data["stages"]]
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Partition:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))
