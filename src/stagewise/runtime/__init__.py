"""The stage runtime: interpret a schedule on one rank, synchronise and clip gradients."""

from ._executor import PipelineExecutor, StepError, TimelineEvent
from ._grads import all_reduce_grads, broadcast_params, clip_global_norm

__all__ = ["PipelineExecutor", "StepError", "TimelineEvent", "all_reduce_grads", "broadcast_params",
           "clip_global_norm"]
