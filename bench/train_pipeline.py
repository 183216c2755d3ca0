"""Pipeline training throughput: Stagewise vs ``torch.distributed.pipelining`` on the same 2-stage model.

Run: ``PYTHONPATH=src python bench/train_pipeline.py [--steps 20] [--warmup 5]``.

Model: 8 x (Linear(1024, 1024) + ReLU) in one ``nn.Sequential`` (``bench/_models.py:deep_mlp``), MSE loss on synthetic
data, global batch 64 cut into 8 microbatches of 8, 2 stages split 4|4 (cut before the 5th Linear, unit ``"8"``),
Adam (lr 1e-3), one compute thread per rank (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``), gloo, 2 processes.

- stagewise: ``Trainer(TrainConfig(stages=2, microbatches=8, global_batch=64, cuts=["8"], schedule=S, trace=DIR))``
  for S in gpipe, 1f1b, ``steps + 1`` steps. A step starts at the earliest recorded event of any rank; a step's time
  is the next step's start minus its own, so it includes data loading, the pipeline, the gradient all-reduce, the
  optimizer and the loss all-reduce.
- torch: manual stage modules (``model[:8]``, ``model[8:]``) in ``PipelineStage``, ``ScheduleGPipe`` /
  ``Schedule1F1B`` with the same loss, data and Adam, ``steps + 1`` steps; every rank stamps the start of each step
  (``schedule.step`` then ``optimizer.step()``), a step starts at the earliest rank's stamp.
- throughput of a run = 1 / the median time of steps ``warmup .. steps-1`` (the median, because this 2-core machine
  is shared: bursts of other load hit single steps; the mean is printed too). Runs alternate torch/Stagewise
  ``--repeats`` times; each framework and schedule keeps its best run.
- efficiency E (the best Stagewise 1F1B run): ``simulate(schedule, median F/B per stage of the timed steps)`` step time
  / the median measured pipeline span of a timed step (first to last pipeline action over both ranks: F, B,
  SEND/RECV, waiting for sends). E EXCLUDES the gradient all-reduce, the optimizer and data loading; ``E_full``
  (printed above the summary) compares the ideal plus the measured all-reduce/optimizer with the full measured step.
- a diagnostic: the median round trip of one boundary tensor through Stagewise's transport vs bare gloo.

Every Stagewise run is done twice, with ``transport="gloo"`` and with ``transport="shm"`` (the shared-memory rings of
``stagewise.comm``), next to the same torch run. The last line is ``train_pipeline gpipe_ratio=X 1f1b_ratio=Y
efficiency=E shm_gpipe_ratio=X2 shm_1f1b_ratio=Y2`` (ratios: Stagewise steps/s over torch's; X, Y, E over gloo).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts its thread pool; forked ranks inherit it
os.environ["MKL_NUM_THREADS"] = "1"

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import MODELS_FILE, deep_mlp, delivery_ms, kind_medians, load_line, read_trace, run_comm  # noqa: E402

from stagewise.launch import spawn  # noqa: E402
from stagewise.runtime import stage_costs_from_events  # noqa: E402
from stagewise.schedule import add_communication, build, simulate  # noqa: E402
from stagewise.train import TrainConfig, Trainer  # noqa: E402

STAGES, MICROBATCHES, BATCH, HIDDEN, LAYERS = 2, 8, 64, 1024, 8
CUT = "8"  # unit "8" is the 5th Linear: stage 0 = Linear 1-4, stage 1 = Linear 5-8
LR = 1e-3
PRELOAD = ("torch", "torch.export", "torch._dynamo", "stagewise.train._worker", "stagewise.comm",
           "torch.distributed.pipelining")
TRANSPORTS = ("gloo", "shm")
_PIPE_KINDS = {"F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "wait"}


# ---------------------------------------------------------------------------------------------------------------------
# Stagewise


def run_stagewise(schedule: str, *, steps: int, warmup: int, trace_root: Path, transport: str = "gloo"
                  ) -> dict[str, Any]:
    trace = trace_root / f"{schedule}-{transport}"
    trace_root.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(model=f"{MODELS_FILE}:deep_mlp", stages=STAGES, microbatches=MICROBATCHES,
                         global_batch=BATCH, schedule=schedule, steps=steps + 1, cuts=[CUT], optimizer="adam", lr=LR,
                         threads=1, dropout=False, trace=str(trace), progress=False, log_every=0,
                         transport=transport, out_dir=str(trace_root / f"out-{schedule}-{transport}"))
    t0 = time.perf_counter()
    result = Trainer(config).fit()
    wall = time.perf_counter() - t0
    by_rank = read_trace(trace)
    starts = [min(min(e["start"] for e in st[k]) for st in by_rank.values()) for k in range(steps + 1)]
    spans, syncs = [], []
    for k in range(warmup, steps):
        pipe = [e for st in by_rank.values() for e in st[k] if e["kind"] in _PIPE_KINDS]
        spans.append(max(e["end"] for e in pipe) - min(e["start"] for e in pipe))
        syncs.append(max(sum(e["end"] - e["start"] for e in st[k] if e["kind"] in ("allreduce", "optimizer"))
                         for st in by_rank.values()))
    sched = add_communication(build(schedule, ranks=STAGES, microbatches=MICROBATCHES))
    trimmed = {r: st[warmup:steps] for r, st in by_rank.items()}
    fwd, bwd, weight = stage_costs_from_events(trimmed, sched)
    ideal = simulate(sched, forward_cost=fwd, backward_cost=bwd, weight_cost=weight).step_time
    return {**_rates(starts, warmup, steps), "span_ms": statistics.median(spans) * 1e3,
            "sync_ms": statistics.median(syncs) * 1e3, "ideal_ms": ideal * 1e3, "fwd_ms": [f * 1e3 for f in fwd],
            "bwd_ms": [b * 1e3 for b in bwd], "wall_s": wall, "trainer_steps_per_s": result.steps_per_s,
            "losses": result.losses, "kinds": kind_medians(trimmed, skip=0),
            "latency_ms": statistics.median(delivery_ms(by_rank, skip=warmup) or [0.0])}


# ---------------------------------------------------------------------------------------------------------------------
# torch.distributed.pipelining (manual stage modules)


def _torch_rank(rank: int, world_size: int, port: int, schedule_name: str, steps: int, warmup: int,
                out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        spec = deep_mlp(layers=LAYERS, hidden=HIDDEN)
        cut = int(CUT)
        submod = spec.model[:cut] if rank == 0 else spec.model[cut:]
        stage = PipelineStage(submod, stage_index=rank, num_stages=world_size, device=torch.device("cpu"))
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
        assert spec.loss is not None
        schedule = cls(stage, n_microbatches=MICROBATCHES, loss_fn=spec.loss)
        opt = torch.optim.Adam(submod.parameters(), lr=LR)
        data = spec.dataset() if spec.dataset is not None else None
        assert data is not None
        xs, ys = data.inputs[0], data.targets[0]
        n = len(data) // BATCH
        losses_out: list[float] = []
        starts: list[float] = []

        def one_step(k: int) -> None:
            starts.append(time.time())
            rows = slice((k % n) * BATCH, (k % n + 1) * BATCH)
            losses: list[torch.Tensor] = []
            if rank == 0:
                schedule.step(xs[rows])
            else:
                schedule.step(target=ys[rows], losses=losses)
                losses_out.append(float(torch.stack(losses).detach().mean()))
            opt.step()
            opt.zero_grad(set_to_none=True)

        for k in range(steps + 1):  # like the Stagewise run: step `steps` only marks where step `steps - 1` ended
            if k == warmup:
                dist.barrier()
            one_step(k)
        dist.barrier()
        Path(out_dir, f"torch-{schedule_name}-rank{rank}.json").write_text(
            json.dumps({"starts": starts, "losses": losses_out}))
    finally:
        dist.destroy_process_group()


def run_torch(schedule: str, *, steps: int, warmup: int, out_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    spawn(_torch_rank, STAGES, args=(schedule, steps, warmup, str(out_dir)), timeout=300, preload=PRELOAD)
    wall = time.perf_counter() - t0
    res = [json.loads((out_dir / f"torch-{schedule}-rank{r}.json").read_text()) for r in range(STAGES)]
    starts = [min(r["starts"][k] for r in res) for k in range(steps + 1)]
    return {**_rates(starts, warmup, steps), "wall_s": wall, "losses": res[-1]["losses"]}


def _rates(starts: list[float], warmup: int, steps: int) -> dict[str, float]:
    """Steps/s over steps ``warmup..steps-1`` from each step's start time: the mean (window) and the median step
    (robust to bursts of load from other processes on a shared machine; the ratios use the median)."""
    durations = [starts[k + 1] - starts[k] for k in range(warmup, steps)]
    window = starts[steps] - starts[warmup]
    return {"steps_per_s": 1.0 / statistics.median(durations), "step_ms": statistics.median(durations) * 1e3,
            "mean_steps_per_s": len(durations) / window, "mean_step_ms": window / len(durations) * 1e3,
            "min_step_ms": min(durations) * 1e3, "max_step_ms": max(durations) * 1e3}


def _print_run(name: str, schedule: str, rep: int, s: dict[str, Any], steps: int) -> None:
    print(f"{name} {schedule:6s} run {rep}: {s['steps_per_s']:6.2f} steps/s (median step "
          f"{s['step_ms']:.1f} ms, mean {s['mean_step_ms']:.1f}, min {s['min_step_ms']:.1f}, max "
          f"{s['max_step_ms']:.1f}; Trainer.fit {s['wall_s']:.1f} s, its own steps/s over all "
          f"{steps + 1} steps {s['trainer_steps_per_s']:.2f}; loss {s['losses'][0]:.4f} -> "
          f"{s['losses'][-1]:.4f})", flush=True)
    print(f"    pipeline span {s['span_ms']:.1f} ms vs simulated ideal {s['ideal_ms']:.1f} ms; "
          f"all-reduce+optimizer {s['sync_ms']:.1f} ms; transfer latency {s['latency_ms']:.2f} ms; "
          f"median F ms per stage {[round(v, 2) for v in s['fwd_ms']]}, "
          f"B ms {[round(v, 2) for v in s['bwd_ms']]}", flush=True)
    print("    median ms per step by rank:kind: " + ", ".join(
        f"r{r}:{k}={v:.1f}" for (r, k), v in s["kinds"].items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per run (the last steps-warmup are timed)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per framework and schedule, alternating; each reports its best run")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        raise SystemExit("need 0 < --warmup < --steps")
    if args.repeats < 1:
        raise SystemExit("need --repeats >= 1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"model: {LAYERS} x Linear({HIDDEN},{HIDDEN})+ReLU, batch {BATCH}, {MICROBATCHES} microbatches, "
          f"{STAGES} stages cut at unit {CUT!r}, Adam lr {LR}, 1 thread/rank; timing steps {args.warmup}.."
          f"{args.steps - 1} ({args.steps - args.warmup} steps), {args.repeats} run(s) each; {load_line()}", flush=True)
    sw: dict[tuple[str, str], dict[str, Any]] = {}
    th: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-pipeline-") as tmp:
        root = Path(tmp)
        for rep in range(args.repeats):
            for schedule in ("gpipe", "1f1b"):
                t = run_torch(schedule, steps=args.steps, warmup=args.warmup, out_dir=root)
                print(f"torch     {schedule:6s} run {rep}: {t['steps_per_s']:6.2f} steps/s (median step "
                      f"{t['step_ms']:.1f} ms, mean {t['mean_step_ms']:.1f}, min {t['min_step_ms']:.1f}, max "
                      f"{t['max_step_ms']:.1f}; process run {t['wall_s']:.1f} s; loss {t['losses'][0]:.4f} -> "
                      f"{t['losses'][-1]:.4f})", flush=True)
                if schedule not in th or t["steps_per_s"] > th[schedule]["steps_per_s"]:
                    th[schedule] = t
                for transport in TRANSPORTS:
                    s = run_stagewise(schedule, steps=args.steps, warmup=args.warmup, trace_root=root / f"sw{rep}",
                                      transport=transport)
                    _print_run(f"stagewise {transport}", schedule, rep, s, args.steps)
                    key = (schedule, transport)
                    if key not in sw or s["steps_per_s"] > sw[key]["steps_per_s"]:
                        sw[key] = s
        comm = run_comm(root, rows=BATCH // MICROBATCHES, hidden=HIDDEN)
    print(f"one boundary transfer (8x1024 fp32) round trip, median: bare gloo isend/irecv {comm['gloo']:.3f} ms, "
          f"Stagewise transport (header frame + payload) {comm['stagewise']:.3f} ms", flush=True)
    one = sw["1f1b", "gloo"]
    eff = one["ideal_ms"] / one["span_ms"]
    eff_full = (one["ideal_ms"] + one["sync_ms"]) / one["step_ms"]
    print(f"best runs: torch gpipe {th['gpipe']['steps_per_s']:.2f}, 1f1b {th['1f1b']['steps_per_s']:.2f} steps/s; "
          + "; ".join(f"stagewise {tr} gpipe {sw['gpipe', tr]['steps_per_s']:.2f}, 1f1b "
                      f"{sw['1f1b', tr]['steps_per_s']:.2f} steps/s" for tr in TRANSPORTS)
          + " (1 / median step time)")
    print(f"efficiency (stagewise 1f1b, best run): E = simulated ideal {one['ideal_ms']:.1f} ms / measured pipeline "
          f"span {one['span_ms']:.1f} ms = {eff:.3f} (EXCLUDES all-reduce, optimizer, data loading); E_full = "
          f"(ideal + all-reduce/optimizer {one['sync_ms']:.1f} ms) / full step {one['step_ms']:.1f} ms = "
          f"{eff_full:.3f}; gpipe E = {sw['gpipe', 'gloo']['ideal_ms'] / sw['gpipe', 'gloo']['span_ms']:.3f}",
          flush=True)
    print(f"total bench time {time.perf_counter() - start:.1f} s; {load_line()}")

    def ratio(schedule: str, transport: str) -> str:
        return f"{sw[schedule, transport]['steps_per_s'] / th[schedule]['steps_per_s']:.3f}"

    print(f"train_pipeline gpipe_ratio={ratio('gpipe', 'gloo')} 1f1b_ratio={ratio('1f1b', 'gloo')} "
          f"efficiency={eff:.3f} shm_gpipe_ratio={ratio('gpipe', 'shm')} shm_1f1b_ratio={ratio('1f1b', 'shm')}")


if __name__ == "__main__":
    main()
