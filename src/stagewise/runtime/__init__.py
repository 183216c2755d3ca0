"""The stage runtime: run a stage forward (training and serving alike), interpret a schedule on one rank, synchronise
and clip gradients, record and draw the trace."""

from ._executor import PipelineExecutor, StepError, TimelineEvent
from ._forward import Forward, run_forward
from ._grads import all_reduce_grads, broadcast_params, clip_global_norm
from ._trace import (
    measured_bubble,
    merge_traces,
    render_timeline,
    stage_costs_from_events,
    timeline_figure,
    write_markers,
    write_rank_trace,
)

__all__ = [
    "Forward",
    "PipelineExecutor",
    "StepError",
    "TimelineEvent",
    "all_reduce_grads",
    "broadcast_params",
    "clip_global_norm",
    "measured_bubble",
    "merge_traces",
    "render_timeline",
    "run_forward",
    "stage_costs_from_events",
    "timeline_figure",
    "write_markers",
    "write_rank_trace",
]
