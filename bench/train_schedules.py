"""Measured pipeline bubble of every schedule (gpipe, 1f1b, interleaved, zb) at 4 stages on 4 processes.

Run: ``PYTHONPATH=src python bench/train_schedules.py [--rows 8] [--steps 8] [--warmup 3] [--schedules a,b]``.

Model: 8 equal layers, Linear(1024, 1024) + ReLU each (``bench/_models.py:deep_mlp``), MSE loss, 8 microbatches of
``--rows`` samples (raise it for heavier steps), one thread per rank, gloo. gpipe, 1f1b and zb run 4 stages of 2
layers (cuts before the 3rd, 5th and 7th Linear); interleaved runs 8 stages of 1 layer, 2 per rank
(``stages_per_rank=2``), so every rank holds the same work under every schedule. Each schedule is one traced
``Trainer.fit()``.

- measured bubble: ``stagewise.runtime._trace.measured_bubble`` (1 - compute time / (ranks x span of the step's
  pipeline actions)) of every step after ``--warmup``; the median is reported.
- simulated bubble: ``simulate(schedule, median measured F/B per stage).bubble_fraction`` with no communication cost,
  and again with ``comm_cost`` = the run's median in-pipeline transfer latency (a RECV's end minus the end of the
  matching SEND, over transfers whose receiver was already waiting), to show what transfer latency alone costs.
- a diagnostic: the median ping-pong round trip of one boundary tensor, Stagewise's transport vs bare gloo.

Caveat printed with the results: 4 single-threaded ranks on a 2-core machine cannot all compute at once; when more
than 2 ranks are busy, each compute action stretches (and counts as busy), so the measured bubble is not the idle time
of dedicated cores.

The last two lines: ``simulated gpipe=.. 1f1b=.. interleaved=.. zb=..`` and
``train_schedules gpipe=.. 1f1b=.. interleaved=.. zb=..`` (measured; 3 decimals).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts its thread pool; forked ranks inherit it
os.environ["MKL_NUM_THREADS"] = "1"

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import MODELS_FILE, delivery_ms, kind_medians, linear_cuts, load_line, read_trace, run_comm  # noqa: E402

from stagewise.runtime import measured_bubble, stage_costs_from_events  # noqa: E402
from stagewise.schedule import SCHEDULE_NAMES, add_communication, build, simulate  # noqa: E402
from stagewise.train import TrainConfig, Trainer  # noqa: E402

RANKS, MICROBATCHES, LAYERS, HIDDEN = 4, 8, 8, 1024  # HIDDEN: the deep_mlp factory's default
SCHEDULES = SCHEDULE_NAMES


def run_schedule(name: str, *, rows: int, steps: int, warmup: int, root: Path) -> dict[str, Any]:
    per_rank = 2 if name == "interleaved" else 1
    stages = RANKS * per_rank
    trace = root / name
    config = TrainConfig(model=f"{MODELS_FILE}:deep_mlp", stages=RANKS, stages_per_rank=per_rank,
                         microbatches=MICROBATCHES, global_batch=rows * MICROBATCHES, schedule=name, steps=steps,
                         cuts=linear_cuts(layers=LAYERS, stages=stages), optimizer="sgd", lr=1e-3, threads=1,
                         dropout=False, trace=str(trace), progress=False, log_every=0, out_dir=str(root / f"o-{name}"))
    t0 = time.perf_counter()
    Trainer(config).fit()
    wall = time.perf_counter() - t0
    by_rank = read_trace(trace)
    timed = range(warmup, steps)
    bubbles = [measured_bubble(by_rank, step=k) for k in timed]
    sched = add_communication(build(name, ranks=RANKS, microbatches=MICROBATCHES, stages_per_rank=per_rank))
    trimmed = {r: st[warmup:steps] for r, st in by_rank.items()}
    fwd, bwd, weight = stage_costs_from_events(trimmed, sched)
    ideal = simulate(sched, forward_cost=fwd, backward_cost=bwd, weight_cost=weight)
    latencies = delivery_ms(by_rank, skip=warmup)
    latency = statistics.median(latencies) if latencies else 0.0
    with_comm = simulate(sched, forward_cost=fwd, backward_cost=bwd, comm_cost=latency / 1e3)
    spans = []
    for k in timed:
        events = [e for st in by_rank.values() for e in st[k] if e["kind"] not in ("allreduce", "optimizer")]
        spans.append(max(e["end"] for e in events) - min(e["start"] for e in events))
    return {"bubble": statistics.median(bubbles), "bubbles": bubbles, "sim": ideal.bubble_fraction,
            "sim_comm": with_comm.bubble_fraction, "latency_ms": latency, "transfers": len(latencies),
            "span_ms": statistics.median(spans) * 1e3,
            "sim_ms": ideal.step_time * 1e3, "sim_comm_ms": with_comm.step_time * 1e3, "wall_s": wall,
            "fwd_ms": [f * 1e3 for f in fwd], "bwd_ms": [b * 1e3 for b in bwd],
            "kinds": kind_medians(trimmed, skip=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="samples per microbatch (heavier layers: raise it)")
    parser.add_argument("--steps", type=int, default=8, help="steps per schedule")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated subset to run")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        raise SystemExit("need 0 <= --warmup < --steps")
    names = [n for n in args.schedules.split(",") if n]
    unknown = sorted(set(names) - set(SCHEDULES))
    if unknown:
        raise SystemExit(f"unknown schedules {unknown}; choose from {','.join(SCHEDULES)}")
    start = time.perf_counter()
    print(f"model: {LAYERS} x Linear({HIDDEN},{HIDDEN})+ReLU, {MICROBATCHES} microbatches of {args.rows}, "
          f"{RANKS} ranks (interleaved: 2 stages per rank), 1 thread/rank, SGD; median over steps {args.warmup}.."
          f"{args.steps - 1}; {load_line()}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-schedules-") as tmp:
        root = Path(tmp)
        comm = run_comm(root, rows=args.rows, hidden=HIDDEN)
        print(f"one boundary transfer ({args.rows}x{HIDDEN} fp32) round trip, median: bare gloo "
              f"{comm['gloo']:.3f} ms, Stagewise transport {comm['stagewise']:.3f} ms", flush=True)
        for name in names:
            r = run_schedule(name, rows=args.rows, steps=args.steps, warmup=args.warmup,
                             root=root)
            results[name] = r
            print(f"{name:11s} measured bubble {r['bubble']:.3f} (per step {[round(b, 3) for b in r['bubbles']]}), "
                  f"simulated {r['sim']:.3f}, simulated with the measured transfer latency {r['latency_ms']:.2f} ms "
                  f"{r['sim_comm']:.3f}; pipeline span "
                  f"{r['span_ms']:.1f} ms vs simulated {r['sim_ms']:.1f} ms ({r['sim_comm_ms']:.1f} with comm); "
                  f"Trainer.fit {r['wall_s']:.1f} s", flush=True)
            print(f"    median F ms per stage {[round(v, 2) for v in r['fwd_ms']]}, B ms "
                  f"{[round(v, 2) for v in r['bwd_ms']]}", flush=True)
            print("    median ms per step by rank:kind: " + ", ".join(
                f"r{k[0]}:{k[1]}={v:.1f}" for k, v in r["kinds"].items()), flush=True)
    print(f"note: {RANKS} single-threaded ranks share {os.cpu_count()} cores (and whatever else runs here: "
          f"{load_line()}); compute stretched by CPU sharing counts as busy in the measured bubble")
    print("simulated with each run's measured transfer latency: " + " ".join(
        f"{n}={results[n]['sim_comm']:.3f}" for n in names))
    print(f"total bench time {time.perf_counter() - start:.1f} s")
    print("simulated " + " ".join(f"{n}={results[n]['sim']:.3f}" for n in names))
    print("train_schedules " + " ".join(f"{n}={results[n]['bubble']:.3f}" for n in names))


if __name__ == "__main__":
    main()
