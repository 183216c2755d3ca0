"""Benchmark the exact chain partitioner: speed on a 1000-unit chain and optimality against brute force.

Run: ``PYTHONPATH=src python bench/partition.py``. The last line is machine-readable:
``partition n=1000 k=64 ms=T optimal_ratio=R`` where T is the median time of ``min_max_cuts`` in milliseconds and R the
worst ratio of our bottleneck to the brute-force optimum over random small chains (1.000 means always optimal).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import time

from stagewise.split._balance import bottleneck, min_max_cuts


def brute_force_bottleneck(costs: list[float], stages: int) -> float:
    """The optimal bottleneck by trying every way to place ``stages - 1`` cuts."""
    n = len(costs)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        worst = max(math.fsum(costs[bounds[j] : bounds[j + 1]]) for j in range(stages))
        best = min(best, worst)
    return best


def time_large(n: int, stages: int, repeats: int, seed: int) -> float:
    """Median milliseconds to partition a random ``n``-unit chain (float costs) into ``stages`` stages."""
    rng = random.Random(seed)
    costs = [rng.lognormvariate(0.0, 0.5) for _ in range(n)]
    min_max_cuts(costs, stages)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        min_max_cuts(costs, stages)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def worst_ratio(chains: int, seed: int) -> float:
    """Worst (our bottleneck / brute-force bottleneck) over random chains of 1..12 units, ints and floats."""
    rng = random.Random(seed)
    worst = 0.0
    for i in range(chains):
        n = rng.randint(1, 12)
        stages = rng.randint(1, n)
        if i % 2:
            costs: list[float] = [float(rng.randint(0, 5)) for _ in range(n)]  # ties and zeros
        else:
            costs = [0.0 if rng.random() < 0.2 else rng.uniform(0.0, 10.0) for _ in range(n)]
        ours = bottleneck(costs, min_max_cuts(costs, stages))
        best = brute_force_bottleneck(costs, stages)
        ratio = 1.0 if best == 0.0 and ours == 0.0 else ours / best
        worst = max(worst, ratio)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="units in the timed chain")
    parser.add_argument("--stages", type=int, default=64, help="stages for the timed chain")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs (the median is reported)")
    parser.add_argument("--chains", type=int, default=600, help="random small chains checked against brute force")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    ms = time_large(args.n, args.stages, args.repeats, args.seed)
    ratio = worst_ratio(args.chains, args.seed)
    print(f"checked {args.chains} random chains against brute force; timed {args.repeats} runs")
    print(f"partition n={args.n} k={args.stages} ms={ms:.3f} optimal_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
