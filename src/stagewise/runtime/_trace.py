"""Measured schedules: per-rank events as a Chrome trace (Perfetto opens it) and a PNG Gantt chart beside the
simulator's ideal timeline for the same stage costs."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..schedule import Schedule, simulate

__all__ = ["measured_bubble", "merge_traces", "render_timeline", "stage_costs_from_events", "write_rank_trace"]

_COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#55A868", "W": "#8C9D3A", "SEND_F": "#BBBBBB", "SEND_B": "#BBBBBB",
           "RECV_F": "#DDDDDD", "RECV_B": "#DDDDDD", "wait": "#EEEEEE", "allreduce": "#C44E52", "optimizer": "#8172B2"}
_COMPUTE = {"F", "B", "I", "W"}


def write_rank_trace(path: Path, *, rank: int, steps: Sequence[Sequence[Mapping[str, Any]]]) -> None:
    """One rank's events, every step: dicts with name, kind, start and end (seconds since the epoch)."""
    path.write_text(json.dumps({"rank": rank, "steps": [list(s) for s in steps]}))


def merge_traces(trace_dir: Path, *, schedule: Schedule) -> dict[str, Any]:
    """Merge every ``rank*.json`` into ``trace.json`` (Chrome trace format: one thread per rank)."""
    ranks = []
    for path in sorted(trace_dir.glob("rank*.json"), key=lambda p: int(p.stem[4:])):
        ranks.append(json.loads(path.read_text()))
    t0 = min(e["start"] for r in ranks for s in r["steps"] for e in s) if ranks else 0.0
    events: list[dict[str, Any]] = []
    for r in ranks:
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r["rank"],
                       "args": {"name": f"rank {r['rank']}"}})
        for step_i, step in enumerate(r["steps"]):
            for e in step:
                events.append({"name": e["name"], "cat": e["kind"], "ph": "X", "pid": 0, "tid": r["rank"],
                               "ts": (e["start"] - t0) * 1e6, "dur": max(0.0, e["end"] - e["start"]) * 1e6,
                               "args": {"step": step_i}})
    trace = {"traceEvents": events, "displayTimeUnit": "ms",
             "otherData": {"schedule": schedule.name, "ranks": schedule.ranks, "stages": schedule.stages,
                           "microbatches": schedule.microbatches}}
    (trace_dir / "trace.json").write_text(json.dumps(trace))
    return trace


def _steps_by_rank(trace_dir: Path) -> dict[int, list[list[dict[str, Any]]]]:
    out = {}
    for path in trace_dir.glob("rank*.json"):
        data = json.loads(path.read_text())
        out[int(data["rank"])] = data["steps"]
    return out


def stage_costs_from_events(steps_by_rank: Mapping[int, list[list[dict[str, Any]]]], schedule: Schedule,
                            ) -> tuple[list[float], list[float], list[float] | None]:
    """Median measured forward, full-backward and weight-gradient time of every stage (seconds), for the simulator.

    For schedules that split the backward (I and W), backward = median I + median W and the weight part is returned
    separately; otherwise it is None.
    """
    times: dict[str, dict[int, list[float]]] = {k: {} for k in ("F", "B", "I", "W")}
    for steps in steps_by_rank.values():
        for step in steps[1:] or steps:  # skip the first (warm-up) step when there are more
            for e in step:
                if e["kind"] in _COMPUTE:
                    times[e["kind"]].setdefault(int(e["stage"]), []).append(e["end"] - e["start"])

    def med(kind: str, stage: int) -> float:
        return statistics.median(times[kind].get(stage, [0.0]))

    stages = range(schedule.stages)
    fwd = [med("F", s) for s in stages]
    if _splits_backward(schedule):
        weight = [med("W", s) for s in stages]
        return fwd, [med("I", s) + w for s, w in zip(stages, weight)], weight
    return fwd, [med("B", s) for s in stages], None


def _splits_backward(schedule: Schedule) -> bool:
    return any(a.kind in ("I", "W") for acts in schedule.actions.values() for a in acts)


def measured_bubble(steps_by_rank: Mapping[int, list[list[dict[str, Any]]]], *, step: int = -1) -> float:
    """Idle fraction of one step: 1 - compute time / (ranks x span of the step's pipeline actions)."""
    busy = 0.0
    starts, ends = [], []
    for steps in steps_by_rank.values():
        events = [e for e in steps[step] if e["kind"] in _COMPUTE or e["kind"].startswith(("SEND", "RECV"))]
        busy += sum(e["end"] - e["start"] for e in events if e["kind"] in _COMPUTE)
        starts.append(min(e["start"] for e in events))
        ends.append(max(e["end"] for e in events))
    span = max(ends) - min(starts)
    return 1.0 - busy / (len(steps_by_rank) * span) if span > 0 else 0.0


def render_timeline(trace_dir: Path, *, schedule: Schedule, step: int = -1) -> Path:
    """Draw the measured step (one row per rank) above the simulated ideal; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps_by_rank = _steps_by_rank(trace_dir)
    fwd, bwd, weight = stage_costs_from_events(steps_by_rank, schedule)
    ideal = simulate(schedule, forward_cost=fwd, backward_cost=bwd, weight_cost=weight)
    ranks = sorted(steps_by_rank)
    fig, axes = plt.subplots(2, 1, figsize=(12, 1.2 + 0.9 * len(ranks) * 2), sharex=False)
    t0 = min(e["start"] for r in ranks for e in steps_by_rank[r][step])
    for row, r in enumerate(ranks):
        for e in steps_by_rank[r][step]:
            kind = e["kind"]
            x, w = (e["start"] - t0) * 1e3, max(1e-3, (e["end"] - e["start"]) * 1e3)
            height = 0.8 if kind in _COMPUTE or kind in ("allreduce", "optimizer") else 0.35
            axes[0].barh(row, w, left=x, height=height, color=_COLORS.get(kind, "#999999"), edgecolor="black",
                         linewidth=0.3)
            if kind in _COMPUTE and w > 0:
                axes[0].text(x + w / 2, row, e["name"], ha="center", va="center", fontsize=6, color="white")
    measured = measured_bubble(steps_by_rank, step=step)
    axes[0].set_title(f"measured: {schedule.name}, {len(ranks)} ranks, {schedule.microbatches} microbatches "
                      f"(bubble {measured:.1%})")
    for r, intervals in ideal.intervals.items():
        for iv in intervals:
            if iv.action.kind in _COMPUTE:
                x, w = iv.start * 1e3, (iv.end - iv.start) * 1e3
                axes[1].barh(r, w, left=x, height=0.8, color=_COLORS[iv.action.kind], edgecolor="black",
                             linewidth=0.3)
                axes[1].text(x + w / 2, r, str(iv.action), ha="center", va="center", fontsize=6, color="white")
    axes[1].set_title(f"simulated ideal with the measured stage costs (bubble {ideal.bubble_fraction:.1%})")
    for ax, n in ((axes[0], len(ranks)), (axes[1], schedule.ranks)):
        ax.set_yticks(range(n), [f"rank {i}" for i in range(n)])
        ax.invert_yaxis()
        ax.set_xlabel("ms")
    legend = [Patch(color=_COLORS[k], label=label) for k, label in
              (("F", "forward"), ("B", "backward"), ("W", "weight grad"), ("RECV_F", "recv / send"),
               ("allreduce", "all-reduce"), ("optimizer", "optimizer"))]
    axes[0].legend(handles=legend, loc="upper right", fontsize=7, ncol=6)
    fig.tight_layout()
    out = trace_dir / "timeline.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
