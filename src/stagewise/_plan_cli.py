"""``stagewise plan`` and ``stagewise probe``: parsers and commands (``stagewise.cli`` wires them in).

The command line is where measuring meets planning: :mod:`stagewise.launch` starts the processes that measure
(links, the optimizer step) and the results go into the pure :mod:`stagewise.plan` as data."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._optimizers import OPTIMIZERS
from .plan import MODES, Cluster, Plan

__all__ = ["add_plan_parser", "add_probe_parser", "cmd_plan", "cmd_probe", "print_memory", "print_plans"]

log = logging.getLogger(__name__)

_MAX_CUTS_SHOWN = 6


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="choose stages, replicas, microbatches and schedule for a cluster",
        description="Profile MODEL (per-unit forward/backward time, parameters, activation bytes), then search every "
                    "layout of the cluster's devices (replicas x stages, microbatches, schedule, exact memory-capped "
                    "cut) and print the best plans. The best one can be written as JSON.")
    p.add_argument("model", metavar="MODEL",
                   help="model factory: 'path/to/file.py:factory' or 'package.module:factory'")
    p.add_argument("--cluster", metavar="FILE", default=None,
                   help="cluster TOML file (default: detect this machine; see 'stagewise probe')")
    p.add_argument("--devices", type=int, default=None, help="plan for the first N devices of the cluster")
    p.add_argument("--mode", choices=MODES, default="train",
                   help="train: fastest step; serve: highest throughput, then lowest latency (default: train)")
    p.add_argument("--global-batch", type=int, default=32,
                   help="samples per step over all replicas (serve: per batch wave) (default: 32)")
    p.add_argument("--profile-batch", type=int, default=None,
                   help="largest microbatch (rows) the units are timed at; they are also timed at a few smaller "
                        "sizes down to 1 row (default: the global batch)")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads per training process, as TrainConfig.threads (default: 1)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
                   help="optimizer whose state counts against memory in train mode (default: adam)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per unit when profiling (default: 3)")
    p.add_argument("--top", type=int, default=3, help="plans to print (default: 3)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the best plan as JSON to FILE")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    from ._progress import Phases
    from ._spec import load_model_spec
    from .launch import profile_model
    from .plan import profile_rows, search
    from .split import params_on_meta

    with Phases("stagewise plan") as phase:  # a spinner on a terminal; erased before the table prints
        phase("reading the cluster" if args.cluster else "detecting this machine")
        cluster = Cluster.read(args.cluster) if args.cluster else Cluster.detect()
        phase(f"building {args.model} on the meta device")
        with params_on_meta():  # profiled unit by unit: only one unit's weights ever exist (plan.profile_chain)
            spec = load_model_spec(args.model)
        rows = profile_rows(args.profile_batch or args.global_batch)
        profile = profile_model(spec, rows=rows, repeats=args.repeats, threads=args.threads,
                                optimizer=args.optimizer if args.mode == "train" else None, model_name=args.model,
                                phase=phase)
        units = profile.units
        phase(f"searching layouts of {args.devices or cluster.num_devices} device(s)")
        plans = search(profile, cluster, mode=args.mode, global_batch=args.global_batch, devices=args.devices,
                       optimizer=args.optimizer, limit=max(1, args.top))
    for plan in plans:
        plan.model = args.model
    print_plans(plans, title=f"{args.model}: best {args.mode} plans for {plans[0].devices} device(s) "
                             f"({len(units)} units, profiled at {', '.join(map(str, rows))} rows)")
    print_memory(plans[0])
    if args.json:
        plans[0].to_json(args.json)
        print(f"best plan written to {args.json}")
    return 0


def _cuts_text(plan: Plan) -> str:
    cuts = plan.cut[1:]
    if not cuts:
        return "-"
    shown = ", ".join(cuts[:_MAX_CUTS_SHOWN])
    return shown + (f", ... (+{len(cuts) - _MAX_CUTS_SHOWN})" if len(cuts) > _MAX_CUTS_SHOWN else "")


def print_plans(plans: Sequence[Plan], *, title: str = "plans", console: Any = None) -> None:
    """A rich table that fits 80 columns: layout (replicas x stages, ``vN`` virtual stages per rank), microbatches x
    rows, schedule, predicted step time, bubble, peak memory per device, throughput; then each plan's cuts (long
    module names: a line per plan, wrapped, instead of a column squeezed to nothing)."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .report import format_bytes

    device = f" ({format_bytes(plans[0].device_memory_bytes)} per device)" if plans else ""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, caption_justify="left",
                  caption=f"layout: replicas x stages (vN: N virtual stages per rank); micro: microbatches x rows; "
                          f"memory: the fullest device's peak{device}")
    for col in ("#", "layout", "micro", "schedule", "step ms", "bubble", "memory", "samples/s"):
        table.add_column(col, justify="left" if col in ("layout", "schedule") else "right", no_wrap=True)
    for i, plan in enumerate(plans, 1):
        virt = f" v{plan.stages_per_rank}" if plan.stages_per_rank > 1 else ""
        table.add_row(str(i), f"{plan.replicas}x{plan.stages}{virt}", f"{plan.microbatches}x{plan.microbatch_rows}",
                      plan.schedule, f"{plan.step_time_s * 1e3:.1f}",
                      f"{plan.bubble_fraction:.0%}", format_bytes(plan.peak_memory_bytes), f"{plan.throughput:,.0f}")
    console = console or Console(width=80)
    console.print(table)
    for i, plan in enumerate(plans, 1):
        console.print(escape(f"#{i} cuts before: {_cuts_text(plan)}"))


def print_memory(plan: Plan, *, console: Any = None) -> None:
    """A table of ``plan``'s predicted memory per device (pipeline rank; every replica the same): weights, gradients,
    optimizer state, activations (the most microbatches alive under the schedule x their bytes) and the total."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from .report import format_bytes

    table = Table(title=f"#1 memory per device ({plan.replicas} replica(s) alike)", box=box.SIMPLE_HEAD,
                  pad_edge=False, caption_justify="left",
                  caption=f"activations: peak microbatches alive under {plan.schedule} x their bytes at "
                          f"{plan.microbatch_rows} rows; device: {format_bytes(plan.device_memory_bytes)}")
    for col in ("rank", "weights", "gradients", "optimizer", "activations", "total"):
        table.add_column(col, justify="right", no_wrap=True)
    parts = [plan.weight_bytes, plan.gradient_bytes, plan.optimizer_bytes, plan.activation_bytes]
    for r in range(plan.stages):
        table.add_row(str(r), *(format_bytes(part[r]) if part else "-" for part in parts),
                      format_bytes(plan.memory_bytes[r]))
    (console or Console(width=80)).print(table)


def add_probe_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe", help="measure this machine's links and write them into a cluster TOML file",
        description="Start two processes, measure point-to-point latency and bandwidth, all-reduce bandwidth and "
                    "latency, what a transfer costs the two processes while they compute, and how much they slow "
                    "each other when both compute, and write them into the cluster file (created from this machine's "
                    "devices if it does not exist; other fields of an existing file are kept).")
    p.add_argument("--cluster", metavar="FILE", default="cluster.toml",
                   help="cluster TOML file to update or create (default: cluster.toml in the current directory)")
    p.add_argument("--bytes", dest="nbytes", type=int, default=4 * 2**20,
                   help="size of the large message and all-reduce, bytes (default: 4 MiB)")
    p.add_argument("--repeats", type=int, default=5, help="timings per measurement, median taken (default: 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the probe may take (default: 60)")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="auto: nccl between two GPUs when the cluster is CUDA and two are visible, else gloo")
    p.add_argument("--hosts", action="store_true",
                   help="measure the links between hosts instead: run under torchrun with one process per host "
                        "(--nproc-per-node 1); node i of the cluster file is the host of rank i, and rank 0 writes "
                        "the measured [[links]] into the file")
    p.add_argument("--iface", metavar="NAME", default=None,
                   help="with --hosts: the network interface that reaches the other hosts (GLOO_SOCKET_IFNAME)")
    p.set_defaults(func=cmd_probe)
    return p


def cmd_probe(args: argparse.Namespace) -> int:
    from ._progress import Phases
    from .launch import measure_links
    from .plan import apply_measurement

    path = Path(args.cluster).absolute()  # the success line names the file wherever the command ran
    if args.hosts:
        return _probe_hosts(args, path)
    with Phases("stagewise probe") as phase:  # a spinner on a terminal; erased before the result prints
        phase(f"reading {path}" if path.exists() else "detecting this machine")
        cluster = Cluster.read(path) if path.exists() else Cluster.detect()
        backend = args.backend
        if backend == "auto":
            import torch

            backend = "nccl" if cluster.device_kind == "cuda" and torch.cuda.device_count() >= 2 else "gloo"
        phase(f"measuring links, all-reduce and contention between two processes ({backend}, "
              f"{args.repeats} repeats)")
        measured = measure_links(nbytes=args.nbytes, repeats=args.repeats, timeout=args.timeout, backend=backend)
    cluster = apply_measurement(cluster, measured)
    cluster.write(path)
    print(f"latency {measured.latency_s * 1e6:.1f} us, bandwidth {measured.bandwidth / 1e9:.3f} GB/s, all-reduce "
          f"{measured.allreduce_bandwidth / 1e9:.3f} GB/s + {cluster.allreduce_latency * 1e6:.1f} us per ring step, "
          f"send {cluster.send_overhead * 1e6:.1f} us, receive {cluster.recv_overhead * 1e6:.1f} us, "
          f"{cluster.action_overhead * 1e6:.1f} us per compute action, compute contention x{cluster.contention:.2f} "
          f"({measured.nbytes} bytes, {measured.backend}); written to {path}")
    return 0


def _probe_hosts(args: argparse.Namespace, path: Path) -> int:
    """``stagewise probe --hosts`` on one rank of a torchrun job with one process per host."""
    from .launch import connect_torchrun, measure_host_links, torchrun_env
    from .plan import set_host_links

    env = torchrun_env()
    if env is None or env.local_world_size != 1:
        raise ValueError("stagewise probe --hosts runs under torchrun with one process per host: torchrun --nnodes N "
                         "--nproc-per-node 1 ... -m stagewise.cli probe --hosts --cluster FILE")
    cluster = Cluster.read(path)  # every host reads it (a shared file, or the same copy on each)
    if len(cluster.nodes) < env.world_size:
        raise ValueError(f"{path} lists {len(cluster.nodes)} node(s) but {env.world_size} hosts take part; list one "
                         "[[nodes]] table per host, in rank order")
    transport = connect_torchrun(env, timeout=args.timeout, iface=args.iface)
    try:
        measured = measure_host_links(transport, nbytes=args.nbytes, repeats=args.repeats)
    finally:
        transport.close()
    if env.rank != 0:
        return 0
    names = [node.name for node in cluster.nodes]
    links = {(names[0], names[r]): link for r, link in measured.items()}
    set_host_links(cluster, links).write(path)
    for (a, b), (bw, lat, both) in links.items():
        print(f"{a} - {b}: bandwidth {bw / 1e6:.1f} MB/s, latency {lat * 1e6:.0f} us, all-reduce {both / 1e6:.1f} MB/s")
    print(f"written to {path}")
    return 0
