"""Cut a chain of unit costs into contiguous stages so that the most expensive stage is as cheap as possible.

This is the "chains-on-chains" partitioning problem. :func:`min_max_cuts` solves it *exactly*:

1. Every float is a dyadic rational ``p / 2**q``, so scaling all costs by ``2**max(q)`` turns them into Python ints
   with no rounding at all (integer costs are kept as they are). All further arithmetic is exact.
2. ``probe(B)`` packs stages greedily (each stage as long as it can be without exceeding ``B``) using ``bisect`` over
   prefix sums: O(stages * log n). It succeeds iff some cut with bottleneck <= ``B`` exists.
3. The bound ``B`` is bisected, but both ends jump to *realisable* stage sums (Pinar & Aykanat, "Fast optimal load
   balancing algorithms for 1D partitioning", JPDC 2004): a successful probe lowers ``hi`` to the largest stage sum it
   actually produced; a failed one raises ``lo`` to the smallest "stage sum + next unit" among its stages (any bound
   below that packs the same stages and fails too). When ``lo == hi`` that value is the optimum.
4. The optimal greedy cut is completed to exactly ``stages`` non-empty stages; splitting a stage never raises the max.
5. When at least ``stages`` units cost something, stages start only at such units (free units join the stage before),
   so no stage costs zero; moving a cut past free units changes no stage's cost, so the optimum stays exact.
"""

from __future__ import annotations

import difflib
import logging
import math
import numbers
from bisect import bisect_right
from collections.abc import Sequence

__all__ = ["bottleneck", "cuts_from_names", "exact_ints", "min_max_cuts", "stage_costs", "uniform_costs"]

logger = logging.getLogger(__name__)

_MAX_LISTED_NAMES = 12


def uniform_costs(n: int) -> list[float]:
    """Return ``n`` unit costs of 1.0 (balance by unit count)."""
    if n < 0:
        raise ValueError(f"uniform_costs needs a non-negative unit count, got {n}")
    return [1.0] * n


def _ratio(i: int, c: object) -> tuple[int, int]:
    """``c`` as ``(numerator, denominator)``, with a message naming the offending unit when it is not a finite
    number."""
    if isinstance(c, numbers.Integral):
        return int(c), 1
    if isinstance(c, (str, bytes)):
        raise ValueError(f"costs[{i}] is {c!r}; unit costs must be numbers")
    try:
        x = float(c)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"costs[{i}] is {c!r}; unit costs must be numbers") from None
    if not math.isfinite(x):
        raise ValueError(f"costs[{i}] is {x}; unit costs must be finite")
    return x.as_integer_ratio()


def exact_ints(costs: Sequence[float]) -> list[int]:
    """Validate ``costs`` and scale them to ints exactly (by the common denominator); ints stay unchanged.

    Floats are dyadic rationals, so the common denominator is a power of two and no rounding happens anywhere.
    """
    values = list(costs)
    if all(type(c) is int for c in values) and (not values or min(values) >= 0):
        return values  # already exact (the planner re-cuts its scaled chain many times)
    try:  # fast path: int, float, numpy floats, Fraction, Decimal all have as_integer_ratio
        ratios = [c.as_integer_ratio() for c in values]
    except (AttributeError, TypeError, ValueError, OverflowError):  # nan/inf/non-numbers: find the culprit
        ratios = [_ratio(i, c) for i, c in enumerate(values)]
    if not ratios:
        return []
    nums, dens = zip(*ratios)
    if min(nums) < 0:
        i = next(i for i, num in enumerate(nums) if num < 0)
        raise ValueError(f"costs[{i}] is {values[i]}; unit costs must be non-negative")
    common = max(dens)
    if common == 1:
        return list(nums)
    if all(type(c) is float or type(c) is int for c in values):  # dyadic: every den divides the largest
        top = common.bit_length()
        return [num << (top - den.bit_length()) for num, den in ratios]
    common = math.lcm(*dens)  # general rationals (Fraction, Decimal)
    return [num * (common // den) for num, den in ratios]


def _prefix(ints: list[int]) -> list[int]:
    prefix = [0] * (len(ints) + 1)
    running = 0
    for i, c in enumerate(ints):
        running += c
        prefix[i + 1] = running
    return prefix


def _probe(prefix: list[int], stages: int, bound: int) -> tuple[bool, int]:
    """Greedy packing under ``bound``; needs ``bound >= max unit``.

    Returns ``(True, largest stage sum produced)`` if at most ``stages`` stages cover the chain, else
    ``(False, smallest stage-sum-plus-next-unit)``, which is a lower bound on the optimum greater than ``bound``.
    """
    n = len(prefix) - 1
    start = 0
    worst = 0
    raise_to = -1
    for _ in range(stages):
        base = prefix[start]
        end = bisect_right(prefix, base + bound, start + 1) - 1  # last index with prefix[end] - base <= bound
        assert end > start, "probe bound below the largest unit"
        if end == n:
            return True, max(worst, prefix[n] - base)
        worst = max(worst, prefix[end] - base)
        extended = prefix[end + 1] - base
        if raise_to < 0 or extended < raise_to:
            raise_to = extended
        start = end
    return False, raise_to


def _optimal_bound(prefix: list[int], stages: int, largest: int) -> int:
    """The smallest achievable bottleneck, by bisection over realisable stage sums."""
    total = prefix[-1]
    lo = max(largest, -(-total // stages))  # no cut beats the largest unit or the average stage
    hi = min(total, lo + largest)  # greedy under lo + largest needs at most `stages` stages
    # One probe at the lower bound first: it settles the common case of one dominant unit at once.
    ok, value = _probe(prefix, stages, lo)
    probes = 1
    if ok:
        hi = value  # == lo: it is feasible and cannot beat the lower bound
    else:
        lo = value
    while lo < hi:
        mid = (lo + hi) // 2
        ok, value = _probe(prefix, stages, mid)
        probes += 1
        if ok:
            hi = value  # <= mid < hi
        else:
            lo = value  # > mid >= lo
    logger.debug("min_max_cuts: %d units, %d stages, optimum after %d probes", len(prefix) - 1, stages, probes)
    return hi


def min_max_cuts(costs: Sequence[float], stages: int) -> list[int]:
    """Cut ``costs`` into exactly ``stages`` contiguous non-empty stages minimising the most expensive stage.

    Returns the start index of every stage: ``stages`` strictly increasing indices, the first one 0. The result is the
    exact optimum (see the module docstring); among optimal cuts it is one with no zero-cost stage when one exists, and
    else the one whose early stages are packed greedily.
    """
    if isinstance(stages, bool) or not isinstance(stages, numbers.Integral):
        raise ValueError(f"stages must be an int, got {stages!r}")
    stages = int(stages)
    if stages < 1:
        raise ValueError(f"stages must be at least 1, got {stages}")
    ints = exact_ints(costs)
    n = len(ints)
    if n == 0:
        raise ValueError("cannot cut an empty chain (no unit costs given); a chain needs at least one unit")
    if stages > n:
        raise ValueError(f"cannot cut {n} units into {stages} stages; use at most {n} stages")
    working = [i for i, c in enumerate(ints) if c > 0]
    if stages <= len(working) < n:
        # Cut only before units that cost something: an optimal cut moved that way keeps every stage's cost, so the
        # optimum is the same, and no stage is left with only free units (a lone ReLU by params) while one can work.
        inner = min_max_cuts([ints[i] for i in working], stages)
        return [0] + [working[s] for s in inner[1:]]
    prefix = _prefix(ints)
    bound = _optimal_bound(prefix, stages, max(ints))

    # Greedy under the optimal bound, except that each stage leaves at least one unit per remaining stage. Once that
    # cap binds, every later stage is a single unit (<= bound); until then this is plain greedy, which fits.
    starts: list[int] = []
    start = 0
    for j in range(stages):
        starts.append(start)
        greedy_end = bisect_right(prefix, prefix[start] + bound, start + 1) - 1
        start = min(greedy_end, n - (stages - 1 - j))
    assert start == n, "greedy under the optimal bound did not cover the chain"
    return starts


def _check_starts(n: int, starts: Sequence[int]) -> list[int]:
    out = [int(s) for s in starts]
    if not out:
        raise ValueError("starts is empty; a partition has at least one stage starting at 0")
    if out[0] != 0:
        raise ValueError(f"the first stage must start at unit 0, got starts[0] = {out[0]}")
    for j in range(1, len(out)):
        if out[j] <= out[j - 1]:
            raise ValueError(f"stage starts must be strictly increasing; starts[{j}] = {out[j]} after {out[j - 1]}")
    if out[-1] >= n:
        raise ValueError(f"stage {len(out) - 1} starts at unit {out[-1]} but the chain has only {n} units")
    return out


def stage_costs(costs: Sequence[float], starts: Sequence[int]) -> list[float]:
    """Return the cost of each stage (correctly rounded sum of its units) for stages beginning at ``starts``."""
    values = list(costs)
    bounds = _check_starts(len(values), starts) + [len(values)]
    return [math.fsum(values[bounds[j] : bounds[j + 1]]) for j in range(len(bounds) - 1)]


def bottleneck(costs: Sequence[float], starts: Sequence[int]) -> float:
    """Return the cost of the most expensive stage."""
    return max(stage_costs(costs, starts))


def _name_list(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED_NAMES])
    more = len(names) - _MAX_LISTED_NAMES
    return shown + (f", ... ({more} more)" if more > 0 else "")


def cuts_from_names(unit_names: Sequence[str], cut_names: Sequence[str]) -> list[int]:
    """Turn user-listed cut points into stage starts.

    Each entry of ``cut_names`` is the name of the unit that *starts* a stage after the first, in chain order:
    units ``["l0", "l1", "l2", "l3"]`` with cuts ``["l2"]`` give ``[0, 2]``.
    """
    if isinstance(cut_names, str):
        raise ValueError(f"cut names must be a list of unit names, got the single string {cut_names!r}")
    names = list(unit_names)
    if not names:
        raise ValueError("the chain has no units, so there is nothing to cut")
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in index:
            raise ValueError(f"unit name {name!r} appears twice in the chain (units {index[name]} and {i})")
        index[name] = i
    starts = [0]
    seen: dict[str, int] = {}
    for pos, name in enumerate(cut_names):
        if name not in index:
            close = difflib.get_close_matches(str(name), names, n=3)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"unknown unit name {name!r} in cuts{hint}; valid names: {_name_list(names)}")
        if name in seen:
            raise ValueError(f"cut {name!r} is listed twice (cuts[{seen[name]}] and cuts[{pos}])")
        seen[name] = pos
        i = index[name]
        if i == 0:
            raise ValueError(
                f"cut {name!r} is the first unit, which always starts stage 0; list only the units that start "
                "the second and later stages"
            )
        if i < starts[-1]:
            raise ValueError(
                f"cuts are out of chain order: {name!r} (unit {i}) comes after {names[starts[-1]]!r} "
                f"(unit {starts[-1]}); list cuts in the order the units run"
            )
        starts.append(i)
    return starts
