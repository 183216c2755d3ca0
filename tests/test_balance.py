"""Exact balanced partition of a chain: optimality against brute force, structure, errors, named cuts, speed."""

from __future__ import annotations

import itertools
import math
import random
import time
from fractions import Fraction

import numpy as np
import pytest

from stagewise.split import _balance
from stagewise.split._balance import bottleneck, cuts_from_names, min_max_cuts, stage_costs, uniform_costs


def brute_force(costs: list, stages: int) -> Fraction:
    """The optimal bottleneck by trying every cut, in exact rational arithmetic."""
    exact = [Fraction(c) for c in costs]
    n = len(exact)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(exact[bounds[j] : bounds[j + 1]], Fraction(0)) for j in range(stages))
        if best is None or worst < best:
            best = worst
    assert best is not None
    return best


def exact_bottleneck(costs: list, starts: list[int]) -> Fraction:
    bounds = [*starts, len(costs)]
    return max(sum((Fraction(c) for c in costs[bounds[j] : bounds[j + 1]]), Fraction(0)) for j in range(len(starts)))


def assert_structure(starts: list[int], n: int, stages: int) -> None:
    assert len(starts) == stages
    assert starts[0] == 0
    assert all(b > a for a, b in zip(starts, starts[1:])), starts  # strictly increasing => every stage non-empty
    assert starts[-1] < n
    assert all(isinstance(s, int) for s in starts)


def random_chain(rng: random.Random, n: int) -> list:
    kind = rng.choice(["small_int", "int", "float", "float_ties", "float_zeros", "mixed"])
    if kind == "small_int":  # many ties and zeros
        return [rng.randint(0, 3) for _ in range(n)]
    if kind == "int":
        return [rng.randint(0, 1000) for _ in range(n)]
    if kind == "float":
        return [rng.uniform(0.0, 10.0) for _ in range(n)]
    if kind == "float_ties":  # sums that do not round-trip in binary (0.1 + 0.2 != 0.3)
        return [rng.choice([0.0, 0.1, 0.2, 0.3, 0.7]) for _ in range(n)]
    if kind == "float_zeros":
        return [0.0 if rng.random() < 0.4 else rng.expovariate(1.0) for _ in range(n)]
    return [rng.choice([0, 1, 2, 0.5, 1.25, 1e-3]) for _ in range(n)]


def test_matches_brute_force_on_random_chains() -> None:
    rng = random.Random(20240601)
    checked = 0
    for _ in range(600):
        n = rng.randint(1, 12)
        stages = rng.randint(1, n)
        costs = random_chain(rng, n)
        starts = min_max_cuts(costs, stages)
        assert_structure(starts, n, stages)
        best = brute_force(costs, stages)
        # Exact: our cut is optimal in exact rational arithmetic, floats included.
        assert exact_bottleneck(costs, starts) == best, (costs, stages, starts)
        ours = bottleneck(costs, starts)
        if all(isinstance(c, int) for c in costs):
            assert ours == best
        else:
            assert math.isclose(ours, float(best), rel_tol=1e-9, abs_tol=0.0), (costs, stages, starts)
        checked += 1
    assert checked == 600


def greedy_stage_count(ints: list[int], bound: int) -> int | None:
    """Stages a linear greedy scan needs so that none exceeds ``bound`` (None if one unit alone exceeds it)."""
    count, running = 1, 0
    for c in ints:
        if c > bound:
            return None
        if running + c > bound:
            count, running = count + 1, 0
        running += c
    return count


def test_optimality_certificate_on_longer_chains() -> None:
    # Too long for brute force; instead certify: the bottleneck B is feasible and the next smaller subarray sum (the
    # only other candidates for an optimum) is not. Costs are made integral by their exact common denominator.
    rng = random.Random(99)
    for _ in range(150):
        n = rng.randint(10, 90)
        stages = rng.randint(1, min(n, 24))
        costs = random_chain(rng, n)
        starts = min_max_cuts(costs, stages)
        assert_structure(starts, n, stages)
        exact = [Fraction(c) for c in costs]
        scale = math.lcm(*(f.denominator for f in exact))
        ints = [int(f * scale) for f in exact]
        bounds = [*starts, n]
        best = max(sum(ints[bounds[j] : bounds[j + 1]]) for j in range(stages))
        prefix = list(itertools.accumulate(ints, initial=0))
        below = [prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1) if prefix[j] - prefix[i] < best]
        if below:
            needed = greedy_stage_count(ints, max(below))
            assert needed is None or needed > stages, (costs, stages, starts)


@pytest.mark.parametrize(
    ("costs", "stages", "expected_bottleneck"),
    [
        ([1, 2, 3, 4, 5], 2, 9),
        ([1, 2, 3, 4, 5], 3, 6),
        ([5, 1, 1, 1, 1, 1], 2, 5),
        ([7], 1, 7),
        ([0, 0, 0], 3, 0),
        ([10, 0, 0, 0], 4, 10),
        ([1, 1, 1, 1, 1, 1, 1, 1], 4, 2),
    ],
)
def test_known_answers(costs: list[int], stages: int, expected_bottleneck: int) -> None:
    starts = min_max_cuts(costs, stages)
    assert_structure(starts, len(costs), stages)
    assert bottleneck(costs, starts) == expected_bottleneck


def test_fills_to_exactly_the_requested_stage_count() -> None:
    # The optimum (one dominant unit) is reached with 2 greedy stages; the rest must still be non-empty stages.
    costs = [100, 1, 1, 1, 1, 1]
    starts = min_max_cuts(costs, 5)
    assert_structure(starts, 6, 5)
    assert bottleneck(costs, starts) == 100
    assert min_max_cuts([3, 3, 3], 3) == [0, 1, 2]


def test_one_stage_and_one_unit_per_stage() -> None:
    costs = [0.5, 2.0, 0.25, 4.0]
    assert min_max_cuts(costs, 1) == [0]
    assert min_max_cuts(costs, 4) == [0, 1, 2, 3]


def test_extreme_float_magnitudes_are_exact() -> None:
    # Subnormals next to huge values: scaling to a common power-of-two denominator keeps everything exact.
    rng = random.Random(7)
    pool = [5e-324, 1e-300, 1e-10, 0.1, 1.0, 3.0, 1e10, 1e300]
    for _ in range(40):
        n = rng.randint(2, 9)
        stages = rng.randint(1, n)
        costs = [rng.choice(pool) for _ in range(n)]
        starts = min_max_cuts(costs, stages)
        assert_structure(starts, n, stages)
        assert exact_bottleneck(costs, starts) == brute_force(costs, stages)


def test_accepts_numpy_fractions_and_huge_ints() -> None:
    rng = random.Random(3)
    floats = [rng.random() for _ in range(40)]
    assert min_max_cuts(np.array(floats), 7) == min_max_cuts(floats, 7)
    ints = [rng.randint(0, 50) for _ in range(40)]
    assert min_max_cuts(np.array(ints, dtype=np.int64), 7) == min_max_cuts(ints, 7)
    thirds = [Fraction(1, 3)] * 3 + [Fraction(1, 2)]
    assert exact_bottleneck(thirds, min_max_cuts(thirds, 2)) == brute_force(thirds, 2) == Fraction(5, 6)
    huge = [2**80, 1, 2**80, 1]  # beyond float precision: ints are used as they are
    assert min_max_cuts(huge, 2) == [0, 2]


def test_integer_costs_are_not_rescaled() -> None:
    assert _balance.exact_ints([3, 0, 7]) == [3, 0, 7]
    assert _balance.exact_ints([3.0, 0.0, 7.0]) == [3, 0, 7]
    assert _balance.exact_ints([0.5, 1, 0.25]) == [2, 4, 1]


@pytest.mark.parametrize(
    ("costs", "stages", "message"),
    [
        ([1, 2, 3], 4, "cannot cut 3 units into 4 stages; use at most 3 stages"),
        ([1, 2, 3], 0, "stages must be at least 1, got 0"),
        ([1, 2, 3], -2, "stages must be at least 1"),
        ([1, 2, 3], 1.5, "stages must be an int"),
        ([1, 2, 3], True, "stages must be an int"),
        ([], 1, "empty chain"),
        ([1.0, -0.5, 2.0], 2, r"costs\[1\] is -0.5; unit costs must be non-negative"),
        ([1, -3], 1, r"costs\[1\] is -3; unit costs must be non-negative"),
        ([1.0, float("nan")], 1, r"costs\[1\] is nan; unit costs must be finite"),
        ([float("inf"), 1.0], 1, r"costs\[0\] is inf; unit costs must be finite"),
        ([1.0, "2"], 1, r"costs\[1\] is '2'; unit costs must be numbers"),
        ([1.0, None], 1, r"costs\[1\] is None; unit costs must be numbers"),
    ],
)
def test_min_max_cuts_rejects_bad_input(costs: list, stages: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        min_max_cuts(costs, stages)


def test_stage_costs_and_bottleneck() -> None:
    costs = [0.1, 0.2, 0.3, 4.0, 1.0]
    assert stage_costs(costs, [0, 3]) == [math.fsum([0.1, 0.2, 0.3]), 5.0]
    assert stage_costs(costs, [0, 3])[0] == 0.6  # correctly rounded, unlike 0.1 + 0.2 + 0.3
    assert stage_costs([1, 2, 3], [0, 1, 2]) == [1, 2, 3]
    assert bottleneck(costs, [0, 3]) == 5.0
    assert bottleneck(costs, [0]) == pytest.approx(5.6)
    for bad, message in [
        ([], "starts is empty"),
        ([1, 3], "first stage must start at unit 0"),
        ([0, 3, 3], "strictly increasing"),
        ([0, 2, 1], "strictly increasing"),
        ([0, 5], "starts at unit 5 but the chain has only 5 units"),
    ]:
        with pytest.raises(ValueError, match=message):
            stage_costs(costs, bad)


def test_uniform_costs() -> None:
    assert uniform_costs(3) == [1.0, 1.0, 1.0]
    assert uniform_costs(0) == []
    assert bottleneck(uniform_costs(10), min_max_cuts(uniform_costs(10), 3)) == 4.0
    with pytest.raises(ValueError, match="non-negative unit count"):
        uniform_costs(-1)


def test_cuts_from_names() -> None:
    units = ["l0", "l1", "l2", "l3"]
    assert cuts_from_names(units, ["l2"]) == [0, 2]
    assert cuts_from_names(units, []) == [0]
    assert cuts_from_names(units, ["l1", "l2", "l3"]) == [0, 1, 2, 3]
    assert cuts_from_names(("embed", "blocks.0", "head"), ("head",)) == [0, 2]


@pytest.mark.parametrize(
    ("cuts", "message"),
    [
        (["l9"], r"unknown unit name 'l9' in cuts.*valid names: 'l0', 'l1', 'l2', 'l3'"),
        (["l2", "l1"], r"out of chain order: 'l1' \(unit 1\) comes after 'l2' \(unit 2\)"),
        (["l2", "l2"], r"cut 'l2' is listed twice"),
        (["l0"], r"'l0' is the first unit"),
        ("l2", "must be a list of unit names"),
    ],
)
def test_cuts_from_names_rejects_bad_cuts(cuts: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cuts_from_names(["l0", "l1", "l2", "l3"], cuts)


def test_cuts_from_names_truncates_long_name_lists_and_suggests() -> None:
    units = [f"layers.{i}" for i in range(200)]
    with pytest.raises(ValueError) as info:
        cuts_from_names(units, ["layer.17"])
    text = str(info.value)
    assert "did you mean 'layers.17'" in text
    assert "'layers.0'" in text and "'layers.199'" not in text
    assert "more)" in text
    assert len(text) < 400


def test_cuts_from_names_rejects_ambiguous_or_empty_chains() -> None:
    with pytest.raises(ValueError, match="appears twice in the chain"):
        cuts_from_names(["a", "b", "a"], ["b"])
    with pytest.raises(ValueError, match="no units"):
        cuts_from_names([], [])


def test_large_chain_is_fast_and_optimal_against_neighbours() -> None:
    rng = random.Random(11)
    costs = [rng.uniform(0.1, 5.0) for _ in range(1000)]
    t0 = time.perf_counter()
    starts = min_max_cuts(costs, 64)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5
    assert_structure(starts, 1000, 64)
    best = exact_bottleneck(costs, starts)
    assert best >= Fraction(math.fsum(costs)) / 64 and best >= Fraction(max(costs))
    # Local optimality: with a strictly smaller bound, greedy packing needs more than 64 stages.
    ints = _balance.exact_ints(costs)
    prefix = _balance._prefix(ints)
    opt = _balance._optimal_bound(prefix, 64, max(ints))
    assert _balance._probe(prefix, 64, opt)[0]
    assert not _balance._probe(prefix, 64, opt - 1)[0]


def test_public_surface() -> None:
    assert sorted(_balance.__all__) == sorted(
        ["min_max_cuts", "stage_costs", "bottleneck", "cuts_from_names", "exact_ints", "uniform_costs"]
    )
