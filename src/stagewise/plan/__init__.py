"""Plan a model's layout on a cluster: how many stages and replicas, which cut, how many microbatches, which schedule.

>>> from stagewise.plan import Cluster, Node, search
>>> cluster = Cluster(nodes=[Node(name="box", devices=4, memory_bytes=2**30)])
>>> profile = profile_chain(spec, rows=[1, 4, 32])                                # doctest: +SKIP
>>> plans = search(profile, cluster, global_batch=32)                             # doctest: +SKIP
>>> plans[0].to_train_kwargs()                                                   # doctest: +SKIP
{'stages': 2, 'replicas': 2, 'microbatches': 4, 'schedule': '1f1b', ...}

Everything that decides is pure (cost model, exact memory-capped cut, search) and works on a profiled chain
(:class:`ChainProfile`, or plain :class:`stagewise.split.UnitInfo`); :func:`profile_chain` times a model in this
process. Nothing here starts a process: :mod:`stagewise.launch` measures links and the optimizer step in fresh ones
and hands the results in as data (:class:`LinkMeasurement`, :meth:`ChainProfile.with_optimizer`).
"""

from ._cluster import DEVICE_KINDS, Cluster, Node
from ._cost import STATE_FACTORS, allreduce_time, optimizer_time, pipeline_lower_bound, transfer_time
from ._cut import capped_min_max_cuts, nested_live, stage_memory
from ._plan import MODES, Plan, PlanError
from ._probe import LinkMeasurement, apply_measurement
from ._profile import ChainProfile, profile_chain, profile_rows
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
    "nested_live",
    "optimizer_time",
    "pipeline_lower_bound",
    "predict",
    "profile_chain",
    "profile_rows",
    "search",
    "stage_memory",
    "transfer_time",
]
