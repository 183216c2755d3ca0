"""Split a model into stages: layer split, sub-model split, task split."""

from ._api import split
from ._balance import exact_ints, min_max_cuts
from ._build import Stage
from ._capture import CaptureError, input_leaves
from ._meta import cast_meta_params, held_param_bytes, materialise, params_on_meta, release, tensor_aliases
from ._pack import StagePack
from ._partition import Partition, StageSpec, UnitInfo, ValueSpec
from ._profile import UnitTimes, time_units
from ._run import StageCall, as_leaf, run_stages
from ._saved import SavedBytes
from ._split import ReadWeights, SplitError, SplitModel
from ._tree import TreeSpec, flatten, unflatten
from ._wire import PackError

__all__ = [
    "CaptureError",
    "PackError",
    "Partition",
    "ReadWeights",
    "SavedBytes",
    "SplitError",
    "SplitModel",
    "Stage",
    "StageCall",
    "StagePack",
    "StageSpec",
    "TreeSpec",
    "UnitInfo",
    "UnitTimes",
    "ValueSpec",
    "as_leaf",
    "cast_meta_params",
    "exact_ints",
    "flatten",
    "held_param_bytes",
    "input_leaves",
    "materialise",
    "min_max_cuts",
    "params_on_meta",
    "release",
    "run_stages",
    "split",
    "tensor_aliases",
    "time_units",
    "unflatten",
]
