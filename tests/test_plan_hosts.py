"""Planning across hosts: per-link speeds between nodes in the cluster file, and the rank order (which stage and
replica each global rank runs) chosen by the cost model: a stage's replicas on one host when gradients are large,
a replica's pipeline on one host when activations are."""

from __future__ import annotations

import pytest

from stagewise.plan import Cluster, HostLink, Node, predict, search
from stagewise.split import UnitInfo
from stagewise.train import TrainConfig
from stagewise.train._rank import Layout

SLOW = 25e6  # bytes/s: a 200 Mbit/s link


def _two_hosts(link: float | None = SLOW) -> Cluster:
    links = [] if link is None else [HostLink(a="a", b="b", bandwidth=link, latency=1e-4)]
    return Cluster(nodes=[Node(name="a", devices=2, memory_bytes=2**32), Node(name="b", devices=2, memory_bytes=2**32)],
                   links=links, inter_bandwidth=1e9)


def _chain(param_bytes: int, out_bytes: int) -> list[UnitInfo]:
    return [UnitInfo(name=f"u{i}", params=param_bytes // 4, param_bytes=param_bytes, forward_ms=1.0, backward_ms=2.0,
                     out_bytes=out_bytes) for i in range(4)]


def _step(units: list[UnitInfo], cluster: Cluster, order: str) -> float:
    return predict(units, cluster, stages=2, replicas=2, microbatches=2, schedule="1f1b", cut=["u0", "u2"],
                   global_batch=16, profile_batch=4, rank_order=order).step_time_s  # type: ignore[arg-type]


def test_cluster_links_round_trip_and_are_checked() -> None:
    cluster = _two_hosts()
    assert Cluster.from_toml(cluster.to_toml()) == cluster
    assert cluster.link(0, 2) == (SLOW, 1e-4) and cluster.link(0, 1) == (cluster.intra_bandwidth, cluster.intra_latency)
    assert cluster.allreduce_link([1, 2]) == (SLOW, max(cluster.allreduce_latency, 1e-4))
    assert _two_hosts(None).link(0, 2) == (1e9, cluster.inter_latency)  # no [[links]]: inter_bandwidth
    both_ways = Cluster(nodes=cluster.nodes, links=[HostLink(a="a", b="b", bandwidth=SLOW, latency=1e-4,
                                                             allreduce_bandwidth=SLOW / 10)])
    assert Cluster.from_toml(both_ways.to_toml()) == both_ways
    assert both_ways.allreduce_link([1, 2])[0] == SLOW / 10 and both_ways.link(1, 2)[0] == SLOW
    with pytest.raises(ValueError, match=r"cluster.links\[0\].b must name a node \(a, b\), got 'c'"):
        Cluster(nodes=cluster.nodes, links=[HostLink(a="a", b="c", bandwidth=1.0, latency=0.0)])
    with pytest.raises(ValueError, match="unknown key 'bandwith'"):
        Cluster.from_toml(cluster.to_toml().replace("bandwidth = 25", "bandwith = 25"))


def test_large_gradients_put_a_stages_replicas_on_one_host_large_activations_a_pipeline() -> None:
    cluster = _two_hosts()
    heavy_params = _chain(param_bytes=4_000_000, out_bytes=4096)
    assert _step(heavy_params, cluster, "stages") < 0.5 * _step(heavy_params, cluster, "pipelines")
    heavy_acts = _chain(param_bytes=4096, out_bytes=4_000_000)
    assert _step(heavy_acts, cluster, "pipelines") < 0.5 * _step(heavy_acts, cluster, "stages")
    best = [p for p in search(heavy_params, cluster, global_batch=16, profile_batch=4, limit=None)
            if (p.stages, p.replicas) == (2, 2)][0]
    assert best.rank_order == "stages"
    assert best.placement() == [(0, 0), (0, 1), (1, 0), (1, 1)]  # ranks 0, 1 (host a): stage 0 of both replicas
    assert best.to_train_kwargs()["rank_order"] == "stages"
    best = [p for p in search(heavy_acts, cluster, global_batch=16, profile_batch=4, limit=None)
            if (p.stages, p.replicas) == (2, 2)][0]
    assert best.rank_order == "pipelines" and best.placement() == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_one_host_keeps_the_default_order() -> None:
    one = Cluster(nodes=[Node(name="a", devices=4, memory_bytes=2**32)])
    plans = search(_chain(4_000_000, 4096), one, global_batch=16, profile_batch=4, limit=None)
    assert {p.rank_order for p in plans} == {"pipelines"}


@pytest.mark.parametrize("order", ["pipelines", "stages"])
def test_the_training_layout_runs_what_the_plan_places(order: str) -> None:
    plan = predict(_chain(4096, 4096), _two_hosts(), stages=2, replicas=2, microbatches=2, schedule="1f1b",
                   cut=["u0", "u2"], global_batch=16, profile_batch=4, rank_order=order)  # type: ignore[arg-type]
    layout = Layout(TrainConfig(model="m:f", **plan.to_train_kwargs()))
    assert [layout.place(g)[::-1] for g in range(4)] == plan.placement()
    assert sorted(g for d in range(2) for g in layout.pipeline(d)) == [0, 1, 2, 3]
