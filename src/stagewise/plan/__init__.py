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
and hands the results in as data (:class:`LinkMeasurement`, :meth:`ChainProfile.with_optimizer`). A plan records
what it was calibrated on (:class:`Calibration`: host, time, figures) and, once ``stagewise.train.verify_plans``
trained its closest candidates, their predicted and measured step times (:class:`Verified`); :func:`auto_threads`
shares a host's cores among the ranks placed on it.
"""

from .._lazy import lazy_exports

__all__ = lazy_exports(__name__, {
    "allreduce_time": "._cost",
    "apply_measurement": "._probe",
    "auto_threads": "._threads",
    "Calibration": "._probe",
    "capped_min_max_cuts": "._cut",
    "ChainProfile": "._profile",
    "Cluster": "._cluster",
    "DEVICE_KINDS": "._cluster",
    "HostLink": "._cluster",
    "LinkMeasurement": "._probe",
    "MODES": "._plan",
    "nested_live": "._cut",
    "Node": "._cluster",
    "OPTIMIZER_SECONDS_PER_BYTE": "._search",
    "optimizer_time": "._cost",
    "pipeline_lower_bound": "._cost",
    "Plan": "._plan",
    "PlanError": "._plan",
    "RANK_ORDERS": "._plan",
    "RankOrder": "._plan",
    "rank_of": "._plan",
    "predict": "._search",
    "profile_chain": "._profile",
    "profile_rows": "._profile",
    "search": "._search",
    "set_host_links": "._probe",
    "stage_memory": "._cut",
    "STATE_FACTORS": "._cost",
    "TRAIN_SCHEDULES": "._search",
    "transfer_time": "._cost",
    "Verified": "._plan",
})
