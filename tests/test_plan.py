"""Planning: cost-model terms on hand-computed examples, the exact memory-capped cut against brute force, search
ranking and memory rejection, Plan JSON and Cluster TOML round-trips, the link probe on two real processes, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import stagewise.plan as plan_pkg
from stagewise import ModelSpec
from stagewise._plan_cli import add_plan_parser, add_probe_parser
from stagewise.launch import measure_links, profile_model
from stagewise.plan import (
    ChainProfile,
    Cluster,
    Node,
    Plan,
    PlanError,
    allreduce_time,
    capped_min_max_cuts,
    optimizer_time,
    pipeline_lower_bound,
    predict,
    profile_chain,
    profile_rows,
    search,
    stage_memory,
    transfer_time,
)
from stagewise.plan._cut import Chain
from stagewise.plan._profile import interpolate
from stagewise.schedule import Sharing, add_communication, build, build_compiled, simulate
from stagewise.split import UnitInfo
from stagewise.train import TrainConfig
from stagewise.zoo.basic import Samples

KIB = 1024


def chain_units(fwd_ms: list[float], *, param_bytes: int | list[int] = 1000, out_bytes: int | list[int] = 1000,
                backward_factor: float = 2.0) -> list[UnitInfo]:
    n = len(fwd_ms)
    pb = param_bytes if isinstance(param_bytes, list) else [param_bytes] * n
    ob = out_bytes if isinstance(out_bytes, list) else [out_bytes] * (n - 1) + [0]
    return [UnitInfo(name=f"layers.{i}", params=pb[i] // 4, param_bytes=pb[i], forward_ms=f,
                     backward_ms=f * backward_factor, out_bytes=ob[i]) for i, f in enumerate(fwd_ms)]


def one_node(devices: int, memory: int = 2**30, **links: float) -> Cluster:
    defaults = {"intra_bandwidth": 1e6, "intra_latency": 1e-4, "inter_bandwidth": 1e5, "inter_latency": 1e-3,
                "allreduce_bandwidth": 1e6, "allreduce_latency": 1e-4, "send_overhead": 0.0, "recv_overhead": 0.0,
                "action_overhead": 0.0, "contention": 1.0}
    return Cluster(nodes=[Node(name="box", devices=devices, memory_bytes=memory)], **{**defaults, **links})


def find(plans: list[Plan], **want: object) -> Plan:
    hits = [p for p in plans if all(getattr(p, k) == v for k, v in want.items())]
    assert len(hits) == 1, (want, [(p.stages, p.replicas, p.microbatches, p.schedule) for p in plans])
    return hits[0]


# --- cost-model terms --------------------------------------------------------------------------------------------


def test_transfer_allreduce_and_optimizer_terms() -> None:
    assert transfer_time(1000, bandwidth=1e6, latency=1e-3) == pytest.approx(2e-3)
    # ring: 2 (D-1)/D * bytes / bw + 2 (D-1) latencies = 1.5 * 1000/1500 + 6 * 0.01
    assert allreduce_time(1000, replicas=4, bandwidth=1500, latency=0.01) == pytest.approx(1.0 + 0.06)
    assert allreduce_time(1000, replicas=1, bandwidth=1500, latency=0.01) == 0.0
    assert optimizer_time(2000, seconds_per_byte=1e-6) == pytest.approx(2e-3)


def simulate_step(name: str, *, ranks: int, microbatches: int, stages_per_rank: int = 1, forward: list[float],
                   backward: list[float], weight: list[float] | None = None,
                   send_forward: list[tuple[float, float]] | None = None,
                   send_backward: list[tuple[float, float]] | None = None, send_cost: float = 0.0,
                   recv_cost: float = 0.0, start: list[float] | None = None, tail: list[float] | None = None,
                   tail_work: list[float] | None = None, contention: float = 1.0, pool: list[int] | None = None,
                   share: list[list[int]] | None = None) -> tuple[float, float, list[float]]:
    """(step, bubble, busy per rank) of the schedule the runtime runs, priced the way the search prices it."""
    compiled = build_compiled(name, ranks=ranks, microbatches=microbatches, stages_per_rank=stages_per_rank)
    sharing = Sharing(contention=contention, pool=pool or [ranks] * ranks,
                      share=share or [[1] * ranks for _ in range(ranks)])
    t = simulate(compiled, forward_cost=forward, backward_cost=backward, weight_cost=weight,
                 forward_links=send_forward, backward_links=send_backward, send_overhead=send_cost,
                 recv_overhead=recv_cost, start=start, tail=tail, tail_work=tail_work, sharing=sharing)
    return t.step_time, t.bubble_fraction, [t.busy[r] for r in range(ranks)]


def test_links_equal_comm_cost_on_either_form_of_the_schedule_and_the_bound_holds() -> None:
    rng = random.Random(0)
    for _ in range(60):
        name = rng.choice(["gpipe", "1f1b", "zb", "interleaved"])
        P = rng.randint(1, 4)
        V = 2 if name == "interleaved" else 1
        M = rng.randint(1, 4) * (P if name == "interleaved" else 1)
        S = P * V
        f = [rng.uniform(0.1, 2) for _ in range(S)]
        b = [rng.uniform(0.1, 3) for _ in range(S)]
        w = [x * rng.uniform(0, 1) for x in b]
        c = rng.choice([0.0, 0.25])
        ref = simulate(build(name, ranks=P, microbatches=M, stages_per_rank=V), forward_cost=f, backward_cost=b,
                       weight_cost=w, comm_cost=c)
        communicated = simulate(add_communication(build(name, ranks=P, microbatches=M, stages_per_rank=V)),
                                forward_cost=f, backward_cost=b, weight_cost=w, comm_cost=c)
        assert communicated.step_time == pytest.approx(ref.step_time, abs=1e-12)
        step, bubble, busy = simulate_step(name, ranks=P, microbatches=M, stages_per_rank=V, forward=f, backward=b,
                                            weight=w, send_forward=[(c, 0.0)] * (S - 1),
                                            send_backward=[(c, 0.0)] * (S - 1))
        assert step == pytest.approx(ref.step_time, abs=1e-12)
        assert bubble == pytest.approx(ref.bubble_fraction, abs=1e-12)
        assert busy == pytest.approx([ref.busy[r] for r in range(P)])
        delay = [c if j % P != (j + 1) % P else 0.0 for j in range(S - 1)]
        bound = pipeline_lower_bound(name, ranks=P, busy=busy, forward=f, backward=b, fwd_delay=delay,
                                     bwd_delay=delay)
        assert bound <= step + 1e-12


def test_link_occupancy_queues_transfers_by_hand() -> None:
    # GPipe, 2 ranks, F = 1, B = 2, each transfer occupies its link for 2 s (no latency):
    # rank 0: F m0 0-1, F m1 1-2; link: m0 1-3, m1 3-5; rank 1: F m0 3-4, F m1 5-6, B m0 6-8, B m1 8-10;
    # grad link: m0 8-10, m1 10-12; rank 0: B m0 10-12, B m1 12-14.
    step, bubble, busy = simulate_step("gpipe", ranks=2, microbatches=2, forward=[1, 1], backward=[2, 2],
                                        send_forward=[(0.0, 2.0)], send_backward=[(0.0, 2.0)])
    assert step == 14.0
    assert busy == [6.0, 6.0]
    assert bubble == pytest.approx(1 - 12 / 28)
    # Latency adds to arrival but does not hold the link: 1 microbatch, latency 0.5, occupancy 1.
    step, _, _ = simulate_step("1f1b", ranks=2, microbatches=1, forward=[1, 1], backward=[2, 2],
                                send_forward=[(0.5, 1.0)], send_backward=[(0.5, 1.0)])
    assert step == 1 + 1.5 + 1 + 2 + 1.5 + 2


def test_rank_side_transfer_costs_start_and_tail_by_hand() -> None:
    # 1F1B, 2 ranks, 1 microbatch, F = 1, B = 2, link latency 0.5; sending costs the rank 0.25, receiving 0.125.
    # rank 0 loads its batch for 0.5: F0 .5-1.5, send -1.75, arrives 2.25; rank 1 receives -2.375, F1 -3.375, B1
    # -5.375, send -5.625, arrives 6.125; rank 0 receives -6.25, B0 -8.25. Tails: rank 0 1.0, rank 1 4.0.
    kw = dict(ranks=2, microbatches=1, forward=[1, 1], backward=[2, 2], send_forward=[(0.5, 0.0)],
              send_backward=[(0.5, 0.0)], send_cost=0.25, recv_cost=0.125, start=[0.5, 0.0])
    step, _, busy = simulate_step("1f1b", **kw, tail=[1.0, 4.0])
    assert step == 9.625  # rank 1: 5.625 + 4.0 ends after rank 0's 8.25 + 1.0
    assert busy == [3.0, 3.0]  # compute only
    assert simulate_step("1f1b", **kw, tail=[1.0, 1.0])[0] == 9.25
    # The search's lower bound stays below the simulation with rank costs, start and tail.
    rng = random.Random(1)
    for _ in range(200):
        name = rng.choice(["gpipe", "1f1b", "zb", "interleaved"])
        P = rng.randint(1, 4)
        V = 2 if name == "interleaved" else 1
        M = rng.randint(1, 4) * (P if name == "interleaved" else 1)
        S = P * V
        f = [rng.uniform(0.1, 2) for _ in range(S)]
        b = [rng.uniform(0.1, 3) for _ in range(S)]
        links = [(rng.uniform(0, 0.5), rng.uniform(0, 0.5)) for _ in range(S - 1)]
        so, ro = rng.uniform(0, 0.3), rng.uniform(0, 0.3)
        start = [rng.uniform(0, 1) for _ in range(P)]
        tail = [rng.uniform(0, 2) for _ in range(P)]
        step, _, _ = simulate_step(name, ranks=P, microbatches=M, stages_per_rank=V, forward=f, backward=b,
                                    send_forward=links, send_backward=links, send_cost=so, recv_cost=ro,
                                    start=start, tail=tail)
        busy = [0.0] * P
        for j in range(S):
            remote = sum(1 for k in (j - 1, j + 1) if 0 <= k < S and k % P != j % P)
            busy[j % P] += M * (f[j] + b[j] + remote * (so + ro))
        bound = pipeline_lower_bound(name, ranks=P, busy=busy, forward=f, backward=b, start=start, tail=tail,
                                     fwd_delay=[so + lat + occ for lat, occ in links],
                                     bwd_delay=[lat + occ + ro for lat, occ in links])
        assert bound <= step + 1e-12, (name, P, M)


def test_stage_time_transfer_allreduce_and_memory_of_a_plan_by_hand() -> None:
    # Two units profiled at 4 rows: forward 10 / 20 ms, backward 20 / 40 ms, 1000 param bytes each, unit 0 sends
    # 1000 bytes. Links: 1e6 B/s, 1e-4 s; all-reduce 1e6 B/s; optimizer 1e-6 s per byte.
    units = chain_units([10.0, 20.0])
    plans = search(units, one_node(2), global_batch=4, profile_batch=4, limit=None, seconds_per_byte=1e-6)
    p = find(plans, stages=2, replicas=1, microbatches=1, schedule="gpipe")  # 1F1B with M = 1 is GPipe: listed once
    assert not [q for q in plans if q.microbatches == 1 and q.schedule == "1f1b" and q.stages > 1]
    assert p.cut == ["layers.0", "layers.1"]
    assert p.stage_time_s == pytest.approx([0.03, 0.06])
    # F0 0-.01, transfer 1e-3 + 1e-4, F1 .0111-.0311, B1 -.0711, transfer back .0011, B0 .0722-.0922; optimizer 1e-3,
    # then the loss all-reduce over both ranks: 2*1/2*8/1e6 + 2*1e-4.
    loss_sync = 8e-6 + 2e-4
    assert p.allreduce_s == pytest.approx(1e-3 + loss_sync)
    assert p.step_time_s == pytest.approx(0.0922 + 1e-3 + loss_sync)
    # Memory: params + grads + Adam (4 x 1000) + live x (input + outputs) x rows / profile rows.
    p2 = find(plans, stages=2, replicas=1, microbatches=2, schedule="1f1b")  # 2 rows per microbatch
    assert p2.stage_time_s == pytest.approx([0.015, 0.03])
    assert p2.memory_bytes == [4000 + 2 * 1000 * 2 // 4, 4000 + 1 * 1000 * 2 // 4]
    assert find(plans, stages=2, replicas=1, microbatches=2, schedule="gpipe").memory_bytes == [5000, 5000]
    # Two replicas: a ring all-reduce of each rank's 1000 gradient bytes, 2*1/2*1000/1e6 + 2*1e-4, then the optimizer,
    # then the loss all-reduce over 4 ranks: 2*3/4*8/1e6 + 6*1e-4.
    p4 = find(search(units, one_node(4), global_batch=8, profile_batch=4, limit=None, seconds_per_byte=1e-6),
              stages=2, replicas=2, microbatches=1, schedule="gpipe")
    post = 1e-3 + 2e-4 + 1e-3 + 1.2e-5 + 6e-4
    assert p4.allreduce_s == pytest.approx(post)
    assert p4.step_time_s == pytest.approx(0.0922 + post)
    assert p4.throughput == pytest.approx(8 / p4.step_time_s)


def test_shared_compute_simulation_by_hand_and_against_the_unshared_one() -> None:
    # Contention 1 is the run-ahead engine; the event-stepped one must agree with it.
    rng = random.Random(2)
    for _ in range(80):
        name = rng.choice(["gpipe", "1f1b", "zb", "interleaved"])
        P = rng.randint(1, 4)
        V = 2 if name == "interleaved" else 1
        M = rng.randint(1, 4) * (P if name == "interleaved" else 1)
        S = P * V
        kw = dict(ranks=P, microbatches=M, stages_per_rank=V, forward=[rng.uniform(0.1, 2) for _ in range(S)],
                  backward=[rng.uniform(0.1, 3) for _ in range(S)],
                  send_forward=[(rng.uniform(0, 0.5), rng.uniform(0, 0.5)) for _ in range(S - 1)],
                  send_backward=[(rng.uniform(0, 0.5), rng.uniform(0, 0.5)) for _ in range(S - 1)],
                  send_cost=rng.uniform(0, 0.2), recv_cost=rng.uniform(0, 0.2),
                  start=[rng.uniform(0, 1) for _ in range(P)])
        tail, work = [rng.uniform(0, 1) for _ in range(P)], [rng.uniform(0, 1) for _ in range(P)]
        fast = simulate_step(name, **kw, tail=[a + b for a, b in zip(tail, work)])
        shared = simulate_step(name, **kw, tail=tail, tail_work=work, contention=1.0 + 1e-12)
        assert shared[0] == pytest.approx(fast[0]) and shared[2] == pytest.approx(fast[2])
        slowed = simulate_step(name, **kw, tail=tail, tail_work=work, contention=1.5)
        assert fast[0] - 1e-9 <= slowed[0] <= 1.5 * fast[0] + 1e-9
    # GPipe, 2 ranks, 1 microbatch, F = B = 1, then 1 s of optimizer each, both ranks on a 2-device node that runs at
    # half speed when both compute: F0 0-1, F1 1-2, B1 2-3, then rank 1's optimizer and B0 share the node: each does
    # half a second's work a second, both done at 5; rank 0's optimizer alone 5-6.
    kw = dict(ranks=2, microbatches=1, forward=[1, 1], backward=[1, 1], tail_work=[1.0, 1.0], contention=2.0)
    assert simulate_step("gpipe", **kw)[0] == pytest.approx(6.0)
    # Two replicas of a 1-stage pipeline on the node: always both computing, everything at half speed.
    assert simulate_step("1f1b", ranks=1, microbatches=2, forward=[1], backward=[1], tail_work=[1.0],
                           contention=2.0, pool=[2], share=[[2]])[0] == pytest.approx(10.0)
    # The search prices a CPU node's contention: data parallelism (both ranks always computing) slows the most.
    units = chain_units([5.0, 5.0])
    plans = {c: search(units, one_node(2, contention=c), global_batch=4, profile_batch=4, limit=None)
             for c in (1.0, 2.0)}
    dp = [find(found, stages=1, replicas=2, microbatches=1) for found in (plans[1.0], plans[2.0])]
    assert dp[1].step_time_s > 1.9 * (dp[0].step_time_s - dp[0].allreduce_s)
    with pytest.raises(ValueError, match="contention must be >= 1"):
        one_node(2, contention=0.5)


def test_interpolated_profile_and_its_terms_in_a_plan_by_hand() -> None:
    assert interpolate([4], [2.0], 2) == 1.0  # one point: proportional
    assert interpolate([1, 4, 16], [1.0, 2.5, 4.0], 2) == pytest.approx(1.5)
    assert interpolate([1, 4, 16], [1.0, 2.5, 4.0], 32) == pytest.approx(6.0)  # extrapolated from the last two
    assert interpolate([1, 4], [3.0, 1.0], 16) == 0.0  # never negative
    # Two units timed at 1 and 4 rows: each call costs 1 ms however small, plus 1 (forward) / 2 (backward) ms a row.
    units = chain_units([5.0, 5.0])
    profile = ChainProfile(units=units, rows=[1, 4], forward_ms=[[2.0, 2.0], [5.0, 5.0]],
                           backward_ms=[[3.0, 3.0], [9.0, 9.0]], loss_forward_ms=[0.5, 0.5],
                           loss_backward_ms=[0.25, 0.25], load_rows=[1, 4], load_ms=[0.1, 0.4],
                           optimizer="adam", optimizer_ms=[1.5, 2.5])
    assert profile.unit_ms(2) == ([3.0, 3.5], [5.0, 5.25])  # the loss is part of the last unit
    assert profile.load_seconds(8) == pytest.approx(0.8e-3)
    cluster = one_node(2, action_overhead=1e-4, send_overhead=2e-4, recv_overhead=3e-4, intra_latency=0.0,
                       intra_bandwidth=1e12)
    p = predict(profile, cluster, stages=2, microbatches=2, schedule="gpipe", cut=["layers.0", "layers.1"],
                global_batch=4)
    # 2 rows a microbatch: F 3 / 3.5 ms, B 5 / 5.25 ms, each action + 0.1 ms.
    assert p.stage_time_s == pytest.approx([8.2e-3, 8.95e-3])
    # Both ranks load 4 rows (0.4 ms) first. rank 0: F m0 .4-.5.5? in ms: F m0 0.4-3.5, send -3.7; F m1 -6.8, send
    # -7.0. rank 1: recv m0 3.7-4.0, F -7.6; recv m1 7.6-7.9, F -11.5, B m0 -16.85, send -17.05, B m1 -22.4, send
    # -22.6. rank 0: recv -17.35, B m0 -22.45; recv m1 22.6-22.9, B -28.0. Tails: optimizer 1.5 / 2.5 ms + loss
    # all-reduce 2 * 1/2 * 8 / 1e6 + 2e-4 s.
    loss_sync = 8e-6 + 2e-4
    assert p.allreduce_s == pytest.approx(2.5e-3 + loss_sync)
    assert p.step_time_s == pytest.approx(28.0e-3 + 1.5e-3 + loss_sync)
    plans = search(profile, cluster, global_batch=4, limit=None)
    same = find(plans, stages=2, microbatches=2, schedule="gpipe")
    assert same.step_time_s == pytest.approx(p.step_time_s) and same.cut == p.cut
    # With fixed costs per call, a pipeline is best with fewer, larger microbatches; in proportion to rows, with more.
    free = one_node(2, intra_latency=0.0, allreduce_latency=0.0)
    found = [search(profile, free, global_batch=4, limit=None),
             search(units, free, global_batch=4, profile_batch=4, limit=None)]
    piped = [next(p for p in plans if p.stages == 2) for plans in found]
    assert piped[0].microbatches < piped[1].microbatches
    assert search(profile, cluster, global_batch=4, limit=3) == plans[:3]
    with pytest.raises(ValueError, match="cut must name 2"):
        predict(profile, cluster, stages=2, microbatches=2, schedule="gpipe", cut=["layers.1"], global_batch=4)
    with pytest.raises(ValueError, match="profile_batch=2 disagrees"):
        search(profile, cluster, global_batch=4, profile_batch=2)
    with pytest.raises(ValueError, match="forward_ms needs one list per row count"):
        ChainProfile(units=units, rows=[1, 4], forward_ms=[[1.0, 1.0]], backward_ms=[[1.0, 1.0], [1.0, 1.0]])


def test_profile_chain_times_a_real_model_without_touching_it() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xs, ys = torch.randn(16, 8), torch.randint(0, 4, (16,))
    spec = ModelSpec(model=net, args=(xs[:2],), loss=torch.nn.functional.cross_entropy,
                     dataset=lambda: Samples((xs,), (ys,)))
    profile = profile_model(spec, rows=[4, 1], repeats=2)  # profile_chain, plus the optimizer in fresh processes
    assert profile.rows == [1, 4] and [u.name for u in profile.units] == ["0", "1", "2"]
    assert all(len(t) == 3 for t in profile.forward_ms + profile.backward_ms)
    assert all(t > 0 for t in profile.forward_ms[0] + profile.loss_forward_ms + profile.loss_backward_ms)
    assert profile.load_rows == [1, 4] and all(t > 0 for t in profile.load_ms)
    assert profile.optimizer == "adam" and profile.optimizer_ms[0] > 0 and profile.optimizer_ms[1] == 0.0  # ReLU
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert profile.units[0].out_bytes == 32 * 4 * 4  # activations at the largest row count
    bare = profile_chain(ModelSpec(model=net, args=(xs[:2],)), rows=[3], repeats=1, rounds=2)
    assert bare.loss_forward_ms == [] and bare.load_ms == [] and bare.optimizer_ms == []
    assert bare.param_shapes == [[[32, 8], [32]], [], [[4, 32], [4]]]  # what the optimizer timing needs
    assert bare.units[0].out_bytes == 3 * 32 * 4  # the 2-row example tiled to 3 rows
    with pytest.raises(ValueError, match="fewer than the 32 rows"):
        profile_chain(spec, rows=[32])


def test_profile_chain_times_every_unit_with_the_threads_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # The captured path: every thread count set while profiling is the one asked for (or the restored one after).
    set_to: list[int] = []
    real_set = torch.set_num_threads

    def recording_set(n: int) -> None:
        set_to.append(n)
        real_set(n)

    monkeypatch.setattr(torch, "set_num_threads", recording_set)
    original = torch.get_num_threads()
    real_set(2)  # neither the default of split's profiling (1) nor the count asked for (3)
    want = 3
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    try:
        profile_chain(ModelSpec(model=net, args=(torch.randn(2, 4),)), rows=[2], repeats=1, threads=want)
        assert want in set_to and set(set_to) <= {want, 2}, set_to
        assert torch.get_num_threads() == 2
    finally:
        real_set(original)

    # The module-boundary fallback runs the modules eagerly: look at the thread count inside a unit's forward.
    seen: list[int] = []

    class Branchy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return self.lin(x) if x.sum() > -1e9 else x  # a branch on a value: torch.export cannot capture it

    chain = torch.nn.Sequential(torch.nn.Linear(4, 4), Branchy(), torch.nn.Linear(4, 2))
    profile = profile_chain(ModelSpec(model=chain, args=(torch.randn(2, 4),)), rows=[2], repeats=2, threads=want)
    assert [u.name for u in profile.units] == ["0", "1", "2"]
    assert seen and set(seen) == {want}


def test_transfers_across_nodes_use_the_inter_node_link() -> None:
    units = chain_units([10.0, 20.0])
    two_nodes = Cluster(nodes=[Node(name="a", devices=1, memory_bytes=2**30), Node(name="b", devices=1,
                                                                                   memory_bytes=2**30)],
                        intra_bandwidth=1e6, intra_latency=1e-4, inter_bandwidth=1e5, inter_latency=1e-3,
                        allreduce_bandwidth=1e6, send_overhead=0.0, recv_overhead=0.0, action_overhead=0.0)
    p = find(search(units, two_nodes, global_batch=4, profile_batch=4, limit=None, seconds_per_byte=0.0),
             stages=2, microbatches=1, schedule="gpipe")
    hop = 1e-3 + 1000 / 1e5
    loss_sync = 8 / 1e5 + 2 * 1e-3  # the loss all-reduce spans both nodes: inter-node bandwidth and latency
    assert p.step_time_s == pytest.approx(0.01 + hop + 0.02 + 0.04 + hop + 0.02 + loss_sync)
    assert p.latency_s == pytest.approx(0.01 + hop + 0.02)


# --- the exact memory-capped cut ----------------------------------------------------------------------------------


def brute_force(time: list[float], stages: int, weight: list[int], act: list[int], live: list[int], cap: int,
                input_act: int) -> Fraction | None:
    n, best = len(time), None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        starts = [0, *cuts]
        if max(stage_memory(weight, act, starts, live, input_act=input_act)) > cap:
            continue
        bounds = [*starts, n]
        value = max(sum((Fraction(x) for x in time[bounds[j]:bounds[j + 1]]), Fraction(0)) for j in range(stages))
        if best is None or value < best:
            best = value
    return best


def test_capped_cut_is_exact_against_brute_force() -> None:
    rng = random.Random(7)
    feasible = infeasible = 0
    for _ in range(400):
        n = rng.randint(1, 8)
        stages = rng.randint(1, n)
        time = [rng.choice([0.0, rng.uniform(0, 10), float(rng.randint(0, 4))]) for _ in range(n)]
        weight = [rng.randint(0, 20) for _ in range(n)]
        act = [rng.randint(0, 10) for _ in range(n)]
        live = sorted((rng.randint(1, 5) for _ in range(stages)), reverse=True)
        cap, input_act = rng.randint(5, 80), rng.randint(0, 5)
        got = capped_min_max_cuts(time, stages, weight=weight, act=act, live=live, cap=cap, input_act=input_act)
        best = brute_force(time, stages, weight, act, live, cap, input_act)
        if best is None:
            assert got is None
            infeasible += 1
            continue
        feasible += 1
        assert got is not None and len(got) == stages and got[0] == 0
        assert all(b > a for a, b in zip(got, got[1:])) and got[-1] < n
        assert max(stage_memory(weight, act, got, live, input_act=input_act)) <= cap
        bounds = [*got, n]
        assert max(sum((Fraction(x) for x in time[bounds[j]:bounds[j + 1]]), Fraction(0))
                   for j in range(stages)) == best
    assert feasible > 50 and infeasible > 50  # both branches were exercised


def test_capped_cut_with_rising_live_stays_under_the_cap() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(2, 8)
        stages = rng.randint(2, n)
        time = [rng.uniform(0, 5) for _ in range(n)]
        weight, act = [rng.randint(0, 10) for _ in range(n)], [rng.randint(0, 6) for _ in range(n)]
        live = [rng.randint(1, 4) for _ in range(stages)]  # not non-increasing: caps are tightened, never loosened
        got = capped_min_max_cuts(time, stages, weight=weight, act=act, live=live, cap=40)
        if got is not None:
            assert max(stage_memory(weight, act, got, live)) <= 40


def test_chain_act_scale_equals_scaled_activations() -> None:
    time, weight, act = [3.0, 1.0, 2.0, 5.0, 1.0], [4, 9, 1, 3, 6], [2, 5, 1, 4, 0]
    live = [3, 2, 1]
    for cap in range(10, 80, 7):
        scaled = capped_min_max_cuts(time, 3, weight=weight, act=[3 * a for a in act], live=live, cap=cap)
        assert Chain(time, weight, act).cut(3, live, cap, act_scale=3) == scaled


def test_capped_cut_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        capped_min_max_cuts([1.0, 2.0], 2, weight=[1, 1], act=[1, 1], live=[1], cap=10)
    with pytest.raises(ValueError, match="non-empty stages"):
        capped_min_max_cuts([1.0], 2, weight=[1], act=[1], live=[1, 1], cap=10)


# --- search ---------------------------------------------------------------------------------------------------------


def random_chain(n: int, seed: int) -> list[UnitInfo]:
    rng = random.Random(seed)
    return chain_units([rng.lognormvariate(0, 0.5) for _ in range(n)],
                       param_bytes=[rng.randint(1, 8) * 256 for _ in range(n)],
                       out_bytes=[rng.randint(1, 4) * 256 for _ in range(n - 1)] + [0])


def test_search_returns_sorted_valid_plans_and_pruning_keeps_the_top() -> None:
    units = random_chain(24, seed=1)
    cluster = one_node(8, memory=64 * KIB)
    every = search(units, cluster, global_batch=32, profile_batch=4, limit=None)
    assert len(every) > 20
    steps = [p.step_time_s for p in every]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(steps, steps[1:]))  # ties are ordered by fewer microbatches
    names = [u.name for u in units]
    for p in every:
        assert p.devices == 8 == p.stages * p.replicas
        assert p.global_batch == 32 and p.cut[0] == names[0] and len(p.cut) == p.stages * p.stages_per_rank
        assert [names.index(c) for c in p.cut] == sorted(names.index(c) for c in p.cut)
        assert p.peak_memory_bytes <= cluster.device_memory
        assert 0.0 <= p.bubble_fraction < 1.0
    assert {p.schedule for p in every} == {"gpipe", "1f1b", "zb", "interleaved"}
    top = search(units, cluster, global_batch=32, profile_batch=4, limit=3)
    assert top == every[:3]  # pruning by the lower bound never drops a plan that belongs in the top


def test_search_never_returns_a_plan_over_the_memory_cap() -> None:
    units = random_chain(12, seed=2)
    roomy = search(units, one_node(4, memory=2**30), global_batch=16, profile_batch=4, limit=None)
    tight_cap = 24 * KIB  # parameters + grads + Adam of all 12 units (4 x ~1.1 KiB x 12) + activations: 4 stages
    tight = search(units, one_node(4, memory=tight_cap), global_batch=16, profile_batch=4, limit=None)
    assert any(p.stages == 1 for p in roomy)
    assert tight and all(p.stages > 1 for p in tight)
    assert all(p.peak_memory_bytes <= tight_cap for p in tight)
    assert len(tight) < len(roomy)
    # Some roomy plans would not fit the tight cap; none of them reappears. The same layout may come back with a
    # different cut, whose slowest stage is then no faster (the unconstrained cut is optimal without the cap).
    def key(p: Plan) -> tuple:
        return p.stages, p.replicas, p.microbatches, p.schedule

    over = {(*key(p), tuple(p.cut)) for p in roomy if p.peak_memory_bytes > tight_cap}
    assert over and not over & {(*key(p), tuple(p.cut)) for p in tight}
    recut = [(p, q) for p in roomy for q in tight if key(p) == key(q) and p.cut != q.cut]
    assert recut
    for p, q in recut:
        assert max(q.stage_time_s) >= max(p.stage_time_s) * (1 - 1e-12)


def test_plan_error_names_the_smallest_change() -> None:
    units = random_chain(10, seed=3)
    cap = 12 * KIB
    with pytest.raises(PlanError) as info:
        search(units, one_node(1, memory=cap), global_batch=8, profile_batch=4)
    assert isinstance(info.value, ValueError)
    match = re.search(r"--devices (\d+)", str(info.value))
    assert match, str(info.value)
    need = int(match.group(1))
    assert need > 1
    assert search(units, one_node(need, memory=cap), global_batch=8, profile_batch=4, devices=need)
    if need > 2:  # one device fewer does not fit: the change is the smallest
        with pytest.raises(PlanError):
            search(units, one_node(need - 1, memory=cap), global_batch=8, profile_batch=4, schedules=("1f1b",))
    # Three devices, two units, a batch of 4: only 1 stage x 3 replicas is possible, and 4 does not split in 3.
    with pytest.raises(PlanError, match="--global-batch 3"):
        search(chain_units([1.0, 1.0]), one_node(3), global_batch=4, profile_batch=4)
    # A unit too big for any device.
    huge = chain_units([1.0, 1.0], param_bytes=[10, 2**20])
    with pytest.raises(PlanError, match=r"'layers.1' needs .*devices with at least"):
        search(huge, one_node(2, memory=2**20), global_batch=4, profile_batch=4)


def test_serve_mode_ranks_by_throughput_then_latency() -> None:
    units = random_chain(16, seed=4)
    cluster = one_node(4, memory=2**30, intra_latency=5e-4)
    plans = search(units, cluster, mode="serve", global_batch=16, profile_batch=4, limit=None)
    keys = [(-p.throughput, p.latency_s) for p in plans]
    assert keys == sorted(keys)
    assert all(p.mode == "serve" and p.schedule == "gpipe" for p in plans)
    best = plans[0]
    # throughput = replicas x rows / slowest (stage forward + its outgoing transfer); here no transfers win
    assert best.stages == 1 and best.replicas == 4
    assert best.throughput == pytest.approx(4 * best.microbatch_rows / best.stage_time_s[0])
    # Among equal throughput, the smaller microbatch has the lower latency and ranks first.
    same = [p for p in plans if p.throughput == pytest.approx(best.throughput)]
    assert [p.microbatch_rows for p in same] == sorted(p.microbatch_rows for p in same)
    # Train mode ranks the same layouts differently (by step time).
    train = search(units, cluster, mode="train", global_batch=16, profile_batch=4, limit=None)
    steps = [p.step_time_s for p in train]
    assert all(b >= a * (1 - 1e-9) for a, b in zip(steps, steps[1:]))
    assert train[0].throughput < best.throughput  # a training step also runs backward, all-reduce and optimizer


def test_serve_terms_by_hand() -> None:
    # Forward 10 / 20 ms at 4 rows; 1000 bytes cross the cut in 1e-4 s + 1000 / 1e6 s; no gradients travel back.
    plans = search(chain_units([10.0, 20.0]), one_node(2), mode="serve", global_batch=4, profile_batch=4, limit=None)
    piped = find(plans, stages=2, microbatches=1)
    assert piped.latency_s == pytest.approx(0.01 + 0.0011 + 0.02)
    assert piped.step_time_s == pytest.approx(0.0311)
    assert piped.throughput == pytest.approx(4 / 0.02)  # slowest of (0.01 + transfer, 0.02)
    assert piped.memory_bytes == [1000 + 1000, 1000 + 1000]  # parameters + (input + outputs) of one microbatch
    replicated = find(plans, stages=1, replicas=2, microbatches=1)  # 2 rows each: 0.015 s for both units
    assert replicated.throughput == pytest.approx(2 * 2 / 0.015)
    # Same throughput with 1-row microbatches, and lower latency: that one ranks first.
    assert (plans[0].stages, plans[0].replicas, plans[0].microbatch_rows) == (1, 2, 1)
    assert plans[0].throughput == pytest.approx(replicated.throughput) and plans[0].latency_s < replicated.latency_s


def test_search_rejects_bad_arguments() -> None:
    units = random_chain(4, seed=5)
    with pytest.raises(ValueError, match="mode"):
        search(units, one_node(2), mode="infer", global_batch=8, profile_batch=4)
    with pytest.raises(ValueError, match="global_batch"):
        search(units, one_node(2), global_batch=0, profile_batch=4)
    with pytest.raises(ValueError, match="schedules"):
        search(units, one_node(2), global_batch=8, profile_batch=4, schedules=("pipedream",))
    with pytest.raises(ValueError, match="--devices 3 asks for more devices"):
        search(units, one_node(2), global_batch=8, profile_batch=4, devices=3)


# --- Plan JSON -------------------------------------------------------------------------------------------------------


def test_plan_json_round_trip_and_train_kwargs(tmp_path: Path) -> None:
    plans = search(random_chain(12, seed=6), one_node(4, memory=64 * KIB), global_batch=16, profile_batch=4,
                   limit=None)
    for p in plans:
        again = Plan.from_json(p.to_json())
        assert again == p
        config = TrainConfig(model="m.py:f", **p.to_train_kwargs())
        lay = config.layout
        assert (lay.stages, lay.replicas, lay.microbatches, lay.schedule, lay.stages_per_rank) == \
            (p.stages, p.replicas, p.microbatches, p.schedule, p.stages_per_rank)
        assert config.split.cuts == (list(p.cut[1:]) or None)
        assert config.microbatch_size == p.microbatch_rows
    path = tmp_path / "plan.json"
    plans[0].to_json(path)
    assert Plan.from_json(path) == plans[0]
    data = json.loads(path.read_text())
    with pytest.raises(ValueError, match="unknown plan field 'stagez'"):
        Plan.from_dict({**data, "stagez": 2})
    with pytest.raises(ValueError, match="Plan.cut"):
        Plan.from_dict({**data, "cut": data["cut"][:-1] + [data["cut"][0]]})
    with pytest.raises(ValueError, match="Plan.devices"):
        Plan.from_dict({**data, "devices": data["devices"] + 1})


# --- Cluster TOML ----------------------------------------------------------------------------------------------------


def test_cluster_toml_round_trip(tmp_path: Path) -> None:
    cluster = Cluster(nodes=[Node(name="gpu-a", devices=8, memory_bytes=80 * 2**30, device_kind="cuda", flops=1e14),
                             Node(name='odd "name"', devices=2, memory_bytes=12345)],
                      intra_bandwidth=1.5e11, intra_latency=1e-5, inter_bandwidth=2.5e10, inter_latency=2e-5,
                      allreduce_bandwidth=7e10, allreduce_latency=1.5e-5, send_overhead=3e-6, recv_overhead=4e-6,
                      action_overhead=6e-6)
    assert Cluster.from_toml(cluster.to_toml()) == cluster
    path = tmp_path / "cluster.toml"
    cluster.write(path)
    assert Cluster.read(path) == cluster
    assert cluster.num_devices == 10 and cluster.device_memory == 12345 and cluster.device_kind == "cpu"
    assert cluster.link(0, 7) == (1.5e11, 1e-5) and cluster.link(7, 8) == (2.5e10, 2e-5)
    assert cluster.allreduce_link([0, 3]) == (7e10, 1.5e-5)
    assert cluster.allreduce_link([0, 9]) == (2.5e10, 2e-5)  # across nodes: inter-node bandwidth and latency
    assert cluster.take(9).nodes[1].devices == 1 and cluster.take(3).num_devices == 3


def test_cluster_validation_names_the_field(tmp_path: Path) -> None:
    good = one_node(2).to_toml()
    cases = {
        good.replace("intra_bandwidth", "intra_bandwith"): r"unknown key 'intra_bandwith' \(did you mean "
                                                            r"'intra_bandwidth'\?\)",
        good.replace("devices = 2", "devices = 0"): r"nodes\[0\]\.devices must be an int >= 1",
        good.replace("memory_bytes", "memory"): r"nodes\[0\]: unknown key 'memory'",
        good.replace('device_kind = "cpu"', 'device_kind = "tpu"'): r"nodes\[0\]\.device_kind must be one of",
        good.replace("inter_latency = 0.001", "inter_latency = -1.0"): r"cluster\.inter_latency must be a finite "
                                                                      r"number >= 0",
        good.split("[[nodes]]")[0]: "missing required key 'nodes'",
        good + "\n[[nodes]]\nname = 'b'\ndevices = 1\n": r"nodes\[1\]: missing required key 'memory_bytes'",
        "nodes = [": "not valid TOML",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match=message):
            Cluster.from_toml(text, source="c.toml")
    with pytest.raises(ValueError, match="allreduce_bandwidth must be a finite number > 0"):
        dataclasses.replace(one_node(2), allreduce_bandwidth=0.0)
    with pytest.raises(FileNotFoundError, match="stagewise probe"):
        Cluster.read(tmp_path / "missing.toml")


def test_detect_describes_this_machine() -> None:
    cluster = Cluster.detect(use_cuda=False)
    assert cluster.num_devices >= 1 and cluster.device_kind == "cpu"
    assert 0 < cluster.device_memory * cluster.num_devices
    assert Cluster.from_toml(cluster.to_toml()) == cluster


# --- probe and CLI ---------------------------------------------------------------------------------------------------


def test_probe_measures_two_real_processes_and_writes_the_cluster_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_probe_parser(parser.add_subparsers())
    path = tmp_path / "cluster.toml"
    Cluster(nodes=[Node(name="x", devices=3, memory_bytes=999)], inter_latency=0.125).write(path)
    monkeypatch.chdir(tmp_path)  # a relative --cluster: the success line names the whole path
    args = parser.parse_args(["probe", "--cluster", "cluster.toml", "--bytes", str(256 * KIB), "--repeats", "3",
                              "--timeout", "40"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"; written to {path}")
    measured = Cluster.read(path)
    assert measured.nodes == [Node(name="x", devices=3, memory_bytes=999)] and measured.inter_latency == 0.125
    assert 0 < measured.intra_latency < 0.5
    assert measured.intra_bandwidth > 1e5 and measured.allreduce_bandwidth > 1e5
    assert (measured.intra_latency, measured.intra_bandwidth) != (Cluster.intra_latency, Cluster.intra_bandwidth)
    assert measured.inter_bandwidth <= measured.intra_bandwidth  # another node is never nearer than this one
    # What a transfer costs the ranks themselves, and the all-reduce latency, were measured too.
    for name in ("allreduce_latency", "send_overhead", "recv_overhead"):
        assert 0 < getattr(measured, name) < 0.5 and getattr(measured, name) != getattr(Cluster, name), name
    assert 1.0 <= measured.contention < 10.0  # how much the two processes slowed each other computing at once
    assert 0.0 <= measured.action_overhead < 0.01  # the runtime's own cost per compute action
    # A cluster file written before these fields existed still reads, with the defaults.
    old = "\n".join(line for line in path.read_text().splitlines()
                    if not line.startswith(("allreduce_latency", "send_overhead", "recv_overhead", "action_overhead")))
    assert Cluster.from_toml(old).send_overhead == Cluster.send_overhead


def test_apply_measurement_keeps_inter_node_links_no_faster_than_measured() -> None:
    measured = plan_pkg.LinkMeasurement(latency_s=2e-4, bandwidth=5e8, allreduce_bandwidth=3e8, nbytes=1024)
    fast_inter = one_node(2, inter_latency=1e-5, inter_bandwidth=1e10)
    got = plan_pkg.apply_measurement(fast_inter, measured)
    assert (got.intra_latency, got.intra_bandwidth, got.allreduce_bandwidth) == (2e-4, 5e8, 3e8)
    assert (got.inter_latency, got.inter_bandwidth) == (2e-4, 5e8)
    slow_inter = one_node(2, inter_latency=1e-2, inter_bandwidth=1e6)
    assert (plan_pkg.apply_measurement(slow_inter, measured).inter_latency,
            plan_pkg.apply_measurement(slow_inter, measured).inter_bandwidth) == (1e-2, 1e6)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="fewer than 2 are visible"):
            measure_links(backend="nccl")
    with pytest.raises(ValueError, match="backend"):
        measure_links(backend="mpi")


def test_cmd_plan_profiles_a_model_and_writes_the_best_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "tiny.py"
    model.write_text("import torch\nfrom torch import nn\n\ndef factory():\n    torch.manual_seed(0)\n"
                     "    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), "
                     "nn.Linear(16, 4))\n    return net, torch.randn(4, 8)\n")
    cluster = tmp_path / "cluster.toml"
    one_node(4).write(cluster)
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    out = tmp_path / "plan.json"
    args = parser.parse_args(["plan", f"{model}:factory", "--cluster", str(cluster), "--devices", "2",
                              "--global-batch", "8", "--json", str(out), "--repeats", "1", "--no-calibrate"])
    assert args.func(args) == 0
    best = Plan.from_json(out)
    assert best.devices == 2 and best.global_batch == 8 and best.model == f"{model}:factory"
    assert best.cut[0] == "0"
    printed = capsys.readouterr().out
    assert "step ms" in printed and "best plan written to" in printed
    assert "#1 memory per device" in printed and "optimizer" in printed and "activations" in printed
    assert [sum(x) for x in zip(best.weight_bytes, best.gradient_bytes, best.optimizer_bytes,
                                best.activation_bytes)] == best.memory_bytes
    assert "profiled at 1, 2, 4, 8 rows" in printed  # the global batch and smaller microbatches down to 1 row
    assert profile_rows(32) == [1, 4, 8, 32] and profile_rows(1) == [1] and profile_rows(512) == [1, 8, 64, 512]


def test_public_surface() -> None:
    assert set(plan_pkg.__all__) >= {"Cluster", "Node", "Plan", "PlanError", "search", "profile_rows",
                                     "capped_min_max_cuts"}
    for name in plan_pkg.__all__:
        assert hasattr(plan_pkg, name), name
