"""Measured schedules: per-rank events as a Chrome trace (Perfetto opens it) and a PNG Gantt chart beside the
simulator's ideal timeline for the same stage costs."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..schedule import Schedule, simulate

__all__ = ["measured_bubble", "merge_traces", "render_timeline", "stage_costs_from_events", "timeline_figure",
           "write_markers", "write_rank_trace"]

MARKERS = "markers.json"
"""Events of the run as a whole (a restart and its cause), written by the launcher beside the ranks' traces."""

_KINDS = {  # kind -> (legend label, colour); one colour per label, so the legend names every colour drawn
    "F": ("forward", "#4C72B0"), "B": ("backward", "#55A868"), "I": ("input grad", "#64B5CD"),
    "W": ("weight grad", "#8C9D3A"), "SEND_F": ("send", "#A0A0A0"), "SEND_B": ("send", "#A0A0A0"),
    "RECV_F": ("receive", "#D0D0D0"), "RECV_B": ("receive", "#D0D0D0"), "wait": ("wait for sends", "#F0E442"),
    "allreduce": ("all-reduce", "#C44E52"), "optimizer": ("optimizer", "#8172B2"),
}
_OTHER = ("other", "#FF9DA7")
_LEGEND_ORDER = [*dict.fromkeys(label for label, _ in _KINDS.values()), _OTHER[0]]
_COMPUTE = {"F", "B", "I", "W"}


def write_rank_trace(path: Path, *, rank: int, steps: Sequence[Sequence[Mapping[str, Any]]]) -> None:
    """One rank's events, every step: dicts with name, kind, start and end (seconds since the epoch)."""
    path.write_text(json.dumps({"rank": rank, "steps": [list(s) for s in steps]}))


def write_markers(trace_dir: Path, markers: Sequence[Mapping[str, Any]]) -> None:
    """The run's markers so far, each a dict with ``name``, ``time`` (seconds since the epoch) and ``args``; they go
    into ``trace.json`` as global instant events (category ``marker``). No markers removes an earlier run's file."""
    path = trace_dir / MARKERS
    if not markers:
        path.unlink(missing_ok=True)
        return
    trace_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(markers)))


def merge_traces(trace_dir: Path, *, schedule: Schedule) -> dict[str, Any]:
    """Merge every ``rank*.json`` and the run's markers into ``trace.json`` (Chrome trace format: one thread per
    rank; markers such as restarts as global instant events)."""
    ranks = []
    for path in sorted(trace_dir.glob("rank*.json"), key=lambda p: int(p.stem[4:])):
        ranks.append(json.loads(path.read_text()))
    markers = json.loads((trace_dir / MARKERS).read_text()) if (trace_dir / MARKERS).is_file() else []
    starts = [e["start"] for r in ranks for s in r["steps"] for e in s] + [m["time"] for m in markers]
    t0 = min(starts, default=0.0)
    events: list[dict[str, Any]] = [{"name": m["name"], "cat": "marker", "ph": "i", "s": "g", "pid": 0, "tid": 0,
                                     "ts": (m["time"] - t0) * 1e6, "args": m.get("args", {})} for m in markers]
    for r in ranks:
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r["rank"],
                       "args": {"name": f"rank {r['rank']}"}})
        for step_i, step in enumerate(r["steps"]):
            for e in step:
                events.append({"name": e["name"], "cat": e["kind"], "ph": "X", "pid": 0, "tid": r["rank"],
                               "ts": (e["start"] - t0) * 1e6, "dur": max(0.0, e["end"] - e["start"]) * 1e6,
                               "args": {"step": step_i}})
    # every rank that wrote a trace (pipeline ranks x replicas), not only the schedule's pipeline ranks
    traced = len(ranks)
    trace = {"traceEvents": events, "displayTimeUnit": "ms",
             "otherData": {"schedule": schedule.name, "ranks": traced, "pipeline_ranks": schedule.ranks,
                           "replicas": traced // schedule.ranks if schedule.ranks else 0,
                           "stages": schedule.stages, "microbatches": schedule.microbatches,
                           "steps": max((len(r["steps"]) for r in ranks), default=0),
                           "events": sum(e["ph"] == "X" for e in events), "markers": len(markers)}}
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
    """Draw the measured step (one row per rank) above the simulated ideal on one time axis; returns the PNG path."""
    import matplotlib.pyplot as plt

    fig = timeline_figure(trace_dir, schedule=schedule, step=step)
    out = trace_dir / "timeline.png"
    try:
        fig.savefig(out, dpi=_DPI)
    finally:
        plt.close(fig)
    return out


_DPI = 110


def timeline_figure(trace_dir: Path, *, schedule: Schedule, step: int = -1) -> Any:
    """The figure :func:`render_timeline` saves: two panels sharing one time axis (ms), the measured step of every
    rank above, the simulated ideal for the measured stage costs below; one legend above both, outside the axes, that
    names every colour drawn; each compute bar labelled with its action (``0F1``), shortened (``F1``, ``1``) or left
    out where the label does not fit inside its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps_by_rank = _steps_by_rank(trace_dir)
    fwd, bwd, weight = stage_costs_from_events(steps_by_rank, schedule)
    ideal = simulate(schedule, forward_cost=fwd, backward_cost=bwd, weight_cost=weight)
    ranks = sorted(steps_by_rank)
    rows = len(ranks) + schedule.ranks
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(12, 1.8 + 0.45 * rows), dpi=_DPI,
                                      layout="constrained", height_ratios=[len(ranks), schedule.ranks])
    used: set[str] = set()
    labels: list[tuple[Any, float, float, int, str]] = []  # (axes, x, width, row, action) of each compute bar

    def bar(ax: Any, row: int, x: float, w: float, kind: str, name: str) -> None:
        label, colour = _KINDS.get(kind, _OTHER)
        used.add(label)
        full = kind in _COMPUTE or kind in ("allreduce", "optimizer")
        ax.barh(row, w, left=x, height=0.8 if full else 0.35, color=colour, edgecolor="black", linewidth=0.3)
        if kind in _COMPUTE:
            labels.append((ax, x, w, row, name))

    t0 = min(e["start"] for r in ranks for e in steps_by_rank[r][step])
    for row, r in enumerate(ranks):
        for e in steps_by_rank[r][step]:
            bar(top, row, (e["start"] - t0) * 1e3, max(1e-3, (e["end"] - e["start"]) * 1e3), e["kind"], e["name"])
    for r, intervals in ideal.intervals.items():
        for iv in intervals:
            if iv.action.kind in _COMPUTE:
                bar(bottom, r, iv.start * 1e3, (iv.end - iv.start) * 1e3, iv.action.kind, str(iv.action))
    measured = measured_bubble(steps_by_rank, step=step)
    top.set_title(f"measured: {schedule.name}, {len(ranks)} ranks, {schedule.microbatches} microbatches "
                  f"(bubble {measured:.1%})", fontsize=9)
    bottom.set_title(f"simulated ideal with the measured stage costs (bubble {ideal.bubble_fraction:.1%})",
                     fontsize=9)
    for ax, names in ((top, ranks), (bottom, range(schedule.ranks))):
        ax.set_yticks(range(len(names)), [f"rank {i}" for i in names])
        ax.set_ylim(len(names) - 0.5, -0.5)  # rank 0 on top
    bottom.set_xlabel("ms since the step began")
    bottom.xaxis.set_tick_params(labelbottom=True)
    colours = dict([*_KINDS.values(), _OTHER])
    handles = [Patch(facecolor=colours[label], edgecolor="black", linewidth=0.3, label=label)
               for label in _LEGEND_ORDER if label in used]
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), fontsize=8, frameon=False)
    _label_bars(fig, labels)
    return fig


def _label_bars(fig: Any, labels: list[tuple[Any, float, float, int, str]]) -> None:
    """Write each action's name inside its bar: ``0F1``, else ``F1``, else ``1``, else nothing, whichever first fits
    with a little margin (measured in pixels once the layout is final, so labels never spill or run together)."""
    fig.canvas.draw()  # runs the constrained layout once
    fig.set_layout_engine("none")  # and keeps it: the axes' pixel sizes measured below are the ones saved
    renderer = fig.canvas.get_renderer()
    for ax, x, w, row, name in labels:
        left, right = ax.transData.transform([(x, row), (x + w, row)])[:, 0]
        room = right - left - 4  # pixels, 2 each side
        if room <= 0:
            continue
        action = name.lstrip("0123456789")  # F1: the kind and microbatch (the row says the rank)
        text = ax.text(x + w / 2, row, name, ha="center", va="center", fontsize=6, color="white", clip_on=True)
        text.set_in_layout(False)
        for candidate in (name, action, action[1:]):
            text.set_text(candidate)
            if candidate and text.get_window_extent(renderer).width <= room:
                break
        else:
            text.remove()
