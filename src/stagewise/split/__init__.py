"""Split a model into stages: layer split, sub-model split, task split."""

from ._api import split
from ._balance import exact_ints, min_max_cuts
from ._build import Stage
from ._capture import CaptureError, input_leaves
from ._partition import Partition, StageSpec, UnitInfo, ValueSpec
from ._run import StageCall, as_leaf, run_stages
from ._split import SplitError, SplitModel
from ._tree import TreeSpec, flatten, unflatten

__all__ = [
    "CaptureError",
    "Partition",
    "SplitError",
    "SplitModel",
    "Stage",
    "StageCall",
    "StageSpec",
    "TreeSpec",
    "UnitInfo",
    "ValueSpec",
    "as_leaf",
    "exact_ints",
    "flatten",
    "input_leaves",
    "min_max_cuts",
    "run_stages",
    "split",
    "unflatten",
]
