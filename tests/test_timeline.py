"""The trace a run writes (issue 13, item 11): trace.json's metadata counts every rank, and the timeline PNG is
readable: one time axis for both panels, a legend outside the bars that names every colour, labels that fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.colors import to_hex

from stagewise.runtime import merge_traces, render_timeline, timeline_figure, write_rank_trace
from stagewise.schedule import Schedule, add_communication, build, simulate


def _write_ranks(trace_dir: Path, kind: str, *, ranks: int, replicas: int, microbatches: int) -> Schedule:
    """Rank traces as the workers write them: two steps of the simulated schedule (stage s takes s+1 ms forward,
    twice that backward), then the all-reduce and the optimizer, on every rank of every replica."""
    schedule = add_communication(build(kind, ranks=ranks, microbatches=microbatches))
    fwd = [0.001 * (s + 1) for s in range(schedule.stages)]
    weight = fwd if kind == "zb" else None
    sim = simulate(schedule, forward_cost=fwd, backward_cost=[2 * f for f in fwd], weight_cost=weight)
    for replica in range(replicas):
        for p in range(ranks):
            t, steps = 1000.0 + 0.0001 * replica, []
            for _ in range(2):
                events = [{"name": str(iv.action), "kind": iv.action.kind, "stage": iv.action.stage,
                           "start": t + iv.start, "end": t + iv.end} for iv in sim.intervals[p]]
                end = max(e["end"] for e in events)
                events += [{"name": "all-reduce", "kind": "allreduce", "stage": -1, "start": end, "end": end + 0.002},
                           {"name": "optimizer", "kind": "optimizer", "stage": -1, "start": end + 0.002,
                            "end": end + 0.003}]
                steps.append(events)
                t = end + 0.01
            rank = replica * ranks + p
            write_rank_trace(trace_dir / f"rank{rank}.json", rank=rank, steps=steps)
    return schedule


def test_trace_json_metadata_counts_every_rank_of_every_replica(tmp_path: Path) -> None:
    schedule = _write_ranks(tmp_path, "1f1b", ranks=2, replicas=2, microbatches=4)
    merge_traces(tmp_path, schedule=schedule)
    trace = json.loads((tmp_path / "trace.json").read_text())
    meta = trace["otherData"]
    assert (meta["ranks"], meta["pipeline_ranks"], meta["replicas"]) == (4, 2, 2), meta
    threads = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    assert sorted(e["tid"] for e in threads) == [0, 1, 2, 3]
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert meta["events"] == len(spans) and meta["steps"] == 2
    assert {e["tid"] for e in spans} == {0, 1, 2, 3}


@pytest.mark.parametrize(("kind", "ranks", "microbatches"), [("1f1b", 2, 4), ("zb", 4, 24)])
def test_timeline_legend_outside_one_time_axis_every_colour_named_labels_fit(
        tmp_path: Path, kind: str, ranks: int, microbatches: int) -> None:
    schedule = _write_ranks(tmp_path, kind, ranks=ranks, replicas=1, microbatches=microbatches)
    fig = timeline_figure(tmp_path, schedule=schedule)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    top, bottom = fig.axes
    # one time scale: the panels share their x axis
    assert top.get_shared_x_axes().joined(top, bottom) and top.get_xlim() == bottom.get_xlim()
    # the legend lies outside both panels, so it covers no bar
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    for ax in (top, bottom):
        assert not box.overlaps(ax.get_window_extent(renderer)), (box, ax.get_window_extent(renderer))
    # every colour drawn is in the legend, once, and the legend names no colour that was not drawn
    named = [to_hex(h.get_facecolor()) for h in legend.legend_handles]
    assert len(named) == len(set(named))
    drawn = {to_hex(p.get_facecolor()) for ax in (top, bottom) for p in ax.patches}
    assert drawn == set(named), (drawn, named)
    # every label lies inside its own bar, so no two run together; labels that do not fit are shortened or left out
    bars = sum(1 for ax in (top, bottom) for p in ax.patches if p.get_height() > 0.5)
    texts = 0
    for ax in (top, bottom):
        for text in ax.texts:
            x, row = text.get_position()
            (bar,) = [p for p in ax.patches if p.get_x() <= x <= p.get_x() + p.get_width()
                      and p.get_y() <= row <= p.get_y() + p.get_height()]
            inner, outer = text.get_window_extent(renderer), bar.get_window_extent(renderer)
            assert outer.x0 <= inner.x0 and inner.x1 <= outer.x1, (text.get_text(), inner, outer)
            texts += 1
    assert texts > 0
    if kind == "zb":  # 24 microbatches on 4 ranks: bars too narrow for "3F17"
        shown = [t.get_text() for ax in (top, bottom) for t in ax.texts]
        assert texts < bars and any(not t[0].isdigit() or len(t) < 3 for t in shown), shown
    png = render_timeline(tmp_path, schedule=schedule)
    assert png.read_bytes().startswith(b"\x89PNG")
