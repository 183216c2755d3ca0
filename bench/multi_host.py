"""Placement across hosts: the planner's rank order against the naive one on two hosts joined by a slow link.

Run (as root: it makes network namespaces): ``PYTHONPATH=src python bench/multi_host.py [--steps 12]``.

Two "hosts" are network namespaces on one bridge (``tests/_netns.py``), each host's outgoing link limited to
``--rate`` (default 200 Mbit/s) with ``tc ... tbf``. The model is ``bench/_models.py:deep_mlp`` (``--layers`` x
Linear(``--hidden``) + ReLU): large gradients, small activations. The planner profiles it (its own path:
:func:`stagewise.launch.profile_model`), measures this machine's process-to-process links
(:func:`stagewise.launch.measure_links`) and the link between the two hosts (``stagewise probe --hosts`` under
torchrun, one process per host, as a user would: ``[[links]]`` in the cluster file; a tbf with the small burst used
here lets TCP through below its nominal rate), and picks the best plan with 2 stages x 2 replicas, rank order
included. That plan and the same plan with the naive rank order (ranks in order: ``pipelines``, each host one whole
replica) are trained with ``torchrun --nnodes 2 --nproc-per-node 2`` (c10d rendezvous on host A, ``--iface`` naming
each host's link), each ``--rounds`` times, alternating. A run's step time is the median, after ``--warmup`` steps,
of the time between the starts of consecutive steps (from its trace). The last line is::

    multi_host placed_vs_naive=R predicted_err=E

R = measured step time of the planner's plan / of the naive one (goal <= 0.8 on a slow link); E = |predicted -
measured| / measured for the planner's plan (goal <= 0.2). This 2-core machine runs all four ranks of both hosts
(and other people's work), while the cluster says each host has two devices of its own: the measured compute is
slower and noisier than the profile's, which E shows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from _models import MODELS_FILE, deep_mlp  # noqa: E402
from _netns import hosts, netns_skip_reason, torchrun_everywhere  # noqa: E402
from plan_accuracy import step_times  # noqa: E402

from stagewise.launch import measure_links, profile_model  # noqa: E402
from stagewise.plan import Cluster, Node, Plan, apply_measurement, predict, profile_rows, search  # noqa: E402

GLOBAL_BATCH = 32
RUN_TIMEOUT_S = 600


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))


def probe_hosts(cluster: Cluster, *, rate: str, tmp: Path) -> Cluster:
    """``cluster`` (two nodes) with the link between them measured by ``stagewise probe --hosts`` on two hosts."""
    path = tmp / "cluster.toml"
    cluster.write(path)
    with hosts(2, rate=rate) as (a, b):
        torchrun_everywhere((a, b), nproc=1, args=["probe", "--hosts", "--cluster", str(path), "--repeats", "5"],
                            logs=[tmp / "probe_a.log", tmp / "probe_b.log"], env=_env(), timeout=RUN_TIMEOUT_S)
    return Cluster.read(path)


def run_on_hosts(plan: Plan, model: str, *, steps: int, rate: str, tmp: Path) -> list[float]:
    """Train ``plan`` with torchrun on two fresh hosts; the seconds between consecutive steps' starts."""
    plan_file, trace = tmp / "plan.json", tmp / "trace"
    plan.to_json(plan_file)
    args = ["train", model, "--plan", str(plan_file), "--steps", str(steps), "--no-progress", "--log-every", "0",
            "--trace", str(trace)]
    with hosts(2, rate=rate) as (a, b):
        torchrun_everywhere((a, b), nproc=2, args=args, logs=[tmp / "host_a.log", tmp / "host_b.log"], env=_env(),
                            timeout=RUN_TIMEOUT_S)
    return step_times(trace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", default="200mbit", help="tbf rate of each host's outgoing link")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    reason = netns_skip_reason()
    if reason is not None:
        raise SystemExit(f"multi_host: cannot make test hosts here: {reason}")
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)", flush=True)
    model = f"{MODELS_FILE}:deep_mlp"
    spec = deep_mlp(layers=args.layers, hidden=args.hidden)
    profile = profile_model(spec, rows=profile_rows(GLOBAL_BATCH), repeats=5, rounds=2, threads=1,
                            model_name=model)
    local = measure_links(repeats=5)
    nodes = [Node(name=name, devices=2, memory_bytes=2**32) for name in ("host-a", "host-b")]
    with tempfile.TemporaryDirectory(prefix="stagewise-multi-host-probe-") as tmp:
        cluster = probe_hosts(apply_measurement(Cluster(nodes=nodes), local), rate=args.rate, tmp=Path(tmp))
    (link,) = cluster.links
    print(f"cluster: intra {cluster.intra_bandwidth / 1e9:.2f} GB/s; host link ({args.rate} tbf) measured "
          f"{link.bandwidth / 1e6:.1f} MB/s one way, {(link.allreduce_bandwidth or 0) / 1e6:.1f} MB/s all-reduce, "
          f"{link.latency * 1e3:.2f} ms", flush=True)
    plans = [p for p in search(profile, cluster, global_batch=GLOBAL_BATCH, limit=None)
             if (p.stages, p.replicas) == (2, 2)]
    placed = plans[0]
    naive = predict(profile, cluster, stages=2, replicas=2, microbatches=placed.microbatches,
                    schedule=placed.schedule, cut=placed.cut, global_batch=GLOBAL_BATCH, rank_order="pipelines")
    print(f"planned: {placed.describe()} (order {placed.rank_order}); naive predicted "
          f"{naive.step_time_s * 1e3:.1f} ms", flush=True)
    measured: dict[str, list[float]] = {"placed": [], "naive": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stagewise-multi-host-") as tmp:
        for r in range(args.rounds):
            for label, plan in (("placed", placed), ("naive", naive)):
                folder = Path(tmp) / f"{label}{r}"
                folder.mkdir()
                gaps = run_on_hosts(plan, model, steps=args.steps, rate=args.rate, tmp=folder)[args.warmup:]
                measured[label].append(statistics.median(gaps))
                print(f"round {r} {label}: step {measured[label][-1] * 1e3:.1f} ms (predicted "
                      f"{plan.step_time_s * 1e3:.1f} ms)", flush=True)
    placed_s, naive_s = (statistics.median(measured[k]) for k in ("placed", "naive"))
    err = abs(placed.step_time_s - placed_s) / placed_s
    print(f"measured in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"multi_host placed_vs_naive={placed_s / naive_s:.3f} predicted_err={err:.3f}")


if __name__ == "__main__":
    main()
