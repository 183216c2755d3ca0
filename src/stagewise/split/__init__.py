"""Split a model into stages: layer split, sub-model split, task split."""

from ._build import Stage
from ._capture import CaptureError, input_leaves
from ._partition import Partition, StageSpec, UnitInfo, ValueSpec
from ._split import SplitError, SplitModel, split

__all__ = ["split", "SplitModel", "SplitError", "CaptureError", "Stage", "Partition", "StageSpec", "UnitInfo",
           "ValueSpec", "input_leaves"]
