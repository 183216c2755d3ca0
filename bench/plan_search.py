"""Benchmark the planner: full search time, exactness of the memory-capped cut, and what cost-blind splits lose.

Run: ``PYTHONPATH=src python bench/plan_search.py``. The last line is machine-readable:
``plan_search n=200 devices=64 ms=T median_ratio_vs_brute=R params_split_ratio=P uniform_split_ratio=U`` where

- T: median milliseconds of a cold ``search`` (caches cleared) of a random 200-unit chain on 64 devices (8 nodes of 8),
  global batch 512, every factorisation, microbatch count and schedule (goal < 1000 ms);
- R: median over random small chains of (our memory-capped bottleneck / brute-force optimum) (goal 1.000);
- P, U: median over the same chains of (bottleneck time of a parameter-count / equal-unit-count split / ours), counted
  where that split also fits the memory cap (how much slower the slowest stage is when the cut ignores time).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from fractions import Fraction

from stagewise.plan import Cluster, Node, capped_min_max_cuts, search, stage_memory
from stagewise.schedule import build_compiled
from stagewise.schedule._peaks import _interleaved_peaks
from stagewise.split import UnitInfo, min_max_cuts


def random_units(n: int, rng: random.Random) -> list[UnitInfo]:
    """A transformer-ish chain: lognormal times, parameters loosely tied to time, activation bytes per cut."""
    units = []
    for i in range(n):
        fwd = rng.lognormvariate(0.0, 0.5)
        params = int(2**20 * fwd * rng.lognormvariate(0.0, 1.0))
        units.append(UnitInfo(name=f"layers.{i}", params=params // 2, param_bytes=params, forward_ms=fwd,
                              backward_ms=2 * fwd, out_bytes=0 if i == n - 1 else rng.randint(1, 4) * 2**18))
    return units


def time_search(repeats: int, seed: int) -> tuple[float, str]:
    rng = random.Random(seed)
    units = random_units(200, rng)
    total = sum(u.param_bytes for u in units)
    # Device memory: a quarter of what params + grads + Adam of the whole model need, so pipelines are required.
    cluster = Cluster(nodes=[Node(name=f"node{i}", devices=8, memory_bytes=total, device_kind="cuda")
                             for i in range(8)],
                      intra_bandwidth=1e11, intra_latency=1e-5, inter_bandwidth=2.5e10, inter_latency=2e-5,
                      allreduce_bandwidth=5e10)
    times = []
    best = None
    for _ in range(repeats):
        build_compiled.cache_clear()
        _interleaved_peaks.cache_clear()
        t0 = time.perf_counter()
        plans = search(units, cluster, global_batch=512, profile_batch=8)
        times.append(time.perf_counter() - t0)
        best = plans[0]
    assert best is not None
    return statistics.median(times) * 1e3, best.describe()


def exact_bottleneck(costs: list[float], starts: list[int]) -> Fraction:
    bounds = [*starts, len(costs)]
    return max(sum((Fraction(c) for c in costs[bounds[j]:bounds[j + 1]]), Fraction(0)) for j in range(len(starts)))


def brute_force(costs: list[float], stages: int, fits: object) -> Fraction | None:
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        starts = [0, *cuts]
        if fits(starts):  # type: ignore[operator]
            value = exact_bottleneck(costs, starts)
            best = value if best is None or value < best else best
    return best


def small_chains(chains: int, seed: int) -> tuple[float, float, float, float, int, int]:
    """(median ratio vs brute force, worst ratio, median params-split ratio, median uniform-split ratio, feasible
    chains, alternative splits skipped for not fitting)."""
    rng = random.Random(seed)
    ratios, params_ratios, uniform_ratios = [], [], []
    skipped = 0
    while len(ratios) < chains:
        n = rng.randint(4, 11)
        stages = rng.randint(2, min(n, 5))
        units = random_units(n, rng)
        times = [u.forward_ms + u.backward_ms for u in units]
        weight = [4 * u.param_bytes for u in units]
        act = [u.out_bytes for u in units]
        live = [stages - j for j in range(stages)]  # 1F1B
        cap = int(sum(weight) / stages * rng.uniform(1.0, 2.0)) + max(act) * stages * 2

        def fits(starts: list[int]) -> bool:
            return max(stage_memory(weight, act, starts, live)) <= cap

        best = brute_force(times, stages, fits)
        ours = capped_min_max_cuts(times, stages, weight=weight, act=act, live=live, cap=cap)
        if best is None:
            assert ours is None, "the capped cut found a cut that brute force says cannot exist"
            continue
        assert ours is not None and fits(ours), "the capped cut missed a feasible cut or broke the cap"
        mine = exact_bottleneck(times, ours)
        ratios.append(float(mine / best))
        for costs, out in (([float(u.params) for u in units], params_ratios), ([1.0] * n, uniform_ratios)):
            other = min_max_cuts(costs, stages)
            if fits(other):
                out.append(float(exact_bottleneck(times, other) / mine))
            else:
                skipped += 1
    return (statistics.median(ratios), max(ratios), statistics.median(params_ratios),
            statistics.median(uniform_ratios), len(ratios), skipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold searches timed (median reported)")
    parser.add_argument("--chains", type=int, default=300, help="random small chains checked against brute force")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ms, best = time_search(args.repeats, args.seed)
    print(f"search: 200 units, 64 devices (8 x 8), global batch 512: {ms:.1f} ms (median of {args.repeats} cold runs)")
    print(f"best plan: {best}")
    median, worst, params, uniform, feasible, skipped = small_chains(args.chains, args.seed + 1)
    print(f"capped cut vs brute force on {feasible} chains of 4..11 units: median {median:.3f}, worst {worst:.3f}")
    print(f"slowest-stage time of cost-blind splits / ours: params {params:.3f}, uniform {uniform:.3f} "
          f"({skipped} splits skipped for exceeding the memory cap)")
    print(f"plan_search n=200 devices=64 ms={ms:.1f} median_ratio_vs_brute={median:.3f} "
          f"params_split_ratio={params:.3f} uniform_split_ratio={uniform:.3f}")


if __name__ == "__main__":
    main()
