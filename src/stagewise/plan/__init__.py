"""Plan a model's layout on a cluster: how many stages and replicas, which cut, how many microbatches, which schedule.

>>> from stagewise.plan import Cluster, Node, search
>>> cluster = Cluster(nodes=[Node(name="box", devices=4, memory_bytes=2**30)])
>>> profile = profile_chain(spec, rows=[1, 4, 32])                                # doctest: +SKIP
>>> plans = search(profile, cluster, global_batch=32)                             # doctest: +SKIP
>>> plans[0].to_train_kwargs()                                                   # doctest: +SKIP
{'stages': 2, 'replicas': 2, 'microbatches': 4, 'schedule': '1f1b', ...}

Everything that decides is pure (cost model, exact memory-capped cut, search) and works on a profiled chain
(:class:`ChainProfile`, or plain :class:`stagewise.split.UnitInfo`); :func:`profile_chain` times a model in this
process and :func:`measure_links` is the only part that starts processes.
"""

from ._cluster import DEVICE_KINDS, Cluster, Node
from ._cost import STATE_FACTORS, allreduce_time, optimizer_time, pipeline_lower_bound, transfer_time
from ._cut import capped_min_max_cuts, nested_live, stage_memory
from ._plan import MODES, Plan, PlanError
from ._probe import LinkMeasurement, apply_measurement, measure_action_overhead, measure_links
from ._profile import ChainProfile, profile_chain
from ._search import OPTIMIZER_SECONDS_PER_BYTE, TRAIN_SCHEDULES, predict, search

__all__ = [
    "DEVICE_KINDS",
    "MODES",
    "OPTIMIZER_SECONDS_PER_BYTE",
    "STATE_FACTORS",
    "TRAIN_SCHEDULES",
    "ChainProfile",
    "Cluster",
    "LinkMeasurement",
    "Node",
    "Plan",
    "PlanError",
    "allreduce_time",
    "apply_measurement",
    "capped_min_max_cuts",
    "measure_action_overhead",
    "measure_links",
    "nested_live",
    "optimizer_time",
    "pipeline_lower_bound",
    "predict",
    "profile_chain",
    "search",
    "stage_memory",
    "transfer_time",
]
