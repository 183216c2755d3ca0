"""``stagewise plan`` and ``stagewise probe``: parsers and commands (``stagewise.cli`` wires them in).

The command line is where measuring meets planning: :mod:`stagewise.launch` starts the processes that measure
(links, the optimizer step) and the results go into the pure :mod:`stagewise.plan` as data."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._optimizers import OPTIMIZERS
from .plan import MODES, Calibration, Cluster, Plan

__all__ = ["add_plan_parser", "add_probe_parser", "cmd_plan", "cmd_probe", "print_memory", "print_plans",
           "print_verified"]

log = logging.getLogger(__name__)

_MAX_CUTS_SHOWN = 6

PROBE_MAX_AGE_S = 3600.0
"""How old a probe file's figures may be before ``stagewise plan`` measures the machine again (``--probe-max-age``)."""


def _auto_or_count(minimum: int, what: str) -> Callable[[str], int | None]:
    """An argparse type: ``auto`` (None) or an int >= ``minimum``."""
    def parse(text: str) -> int | None:
        if text == "auto":
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected 'auto' or {what} >= {minimum}, got {value}")
        return value

    return parse


def _backend(cluster: Cluster, choice: str = "auto") -> str:
    """``choice``, or for auto: nccl between two GPUs when the cluster is CUDA and two are visible, else gloo."""
    if choice != "auto":
        return choice
    import torch

    return "nccl" if cluster.device_kind == "cuda" and torch.cuda.device_count() >= 2 else "gloo"


def calibration_for(cluster: Cluster, *, probe: str | None, max_age_s: float,
                    phase: Callable[[str], object]) -> Calibration:
    """The figures a plan is calibrated with: the probe file's when it exists, was measured on this host and is at
    most ``max_age_s`` old; else measured now (a few seconds), and written to the probe file when one is named."""
    from .launch import calibrate

    host = socket.gethostname() or "localhost"
    if probe is not None and Path(probe).is_file():
        stored = Calibration.read(probe)
        age = stored.age_s()
        if stored.host != host:
            log.info("probe file %s was measured on %s, not this host (%s): measuring again", probe, stored.host, host)
        elif age > max_age_s:
            log.info("probe file %s is %.0f s old (--probe-max-age %.0f): measuring again", probe, age, max_age_s)
        else:
            return stored
    phase("calibrating this machine: links, per-message and per-action overheads, compute contention (a few s)")
    measured = calibrate(backend=_backend(cluster))
    if probe is not None:
        measured.write(probe)
    return measured


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="choose stages, replicas, microbatches and schedule for a cluster",
        description="Calibrate the cost model on this machine (links, per-message and per-action overheads, compute "
                    "contention: a few seconds, or a young --probe file), profile MODEL (per-unit forward/backward "
                    "time, parameters, activation bytes), search every layout of the cluster's devices (replicas x "
                    "stages, microbatches, schedule, exact memory-capped cut) and print the best plans; then train "
                    "the closest candidates for a few steps each (--verify) and keep the fastest measured. The chosen "
                    "plan can be written as JSON, with its calibration and the predicted and measured step times.")
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
    p.add_argument("--threads", type=_auto_or_count(1, "a number of threads"), default=None, metavar="N|auto",
                   help="compute threads per training process (TrainConfig.threads); auto: this host's cores divided "
                        "by the ranks placed on it (default: auto)")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
                   help="optimizer whose state counts against memory in train mode (default: adam)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per unit when profiling (default: 3)")
    p.add_argument("--top", type=int, default=3, help="plans to print (default: 3)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the chosen plan as JSON to FILE: the best predicted, or with --verify the fastest "
                        "measured")
    p.add_argument("--verify", type=_auto_or_count(0, "a number of candidates"), default=None, metavar="K|auto",
                   help="train the K best predicted plans for a few steps each, in the processes training uses, and "
                        "choose the fastest measured (train mode; the model needs a data set); auto: the plans "
                        "predicted within the cost model's own error (20%%) of the best, at most 3, when there are "
                        "two or more; 0: never (default: auto)")
    p.add_argument("--verify-steps", type=int, default=None, metavar="N",
                   help="steps each verified candidate trains per round (two rounds, round-robin; the first 2 steps "
                        "of each are not timed) (default: 10)")
    p.add_argument("--probe", metavar="FILE", default=None,
                   help="probe file (from 'stagewise probe --json FILE' or an earlier plan): its figures calibrate "
                        "the plan when measured on this host at most --probe-max-age ago; otherwise this machine is "
                        "measured now and the figures are written to FILE (default: measure now, keep nothing)")
    p.add_argument("--probe-max-age", type=float, default=PROBE_MAX_AGE_S, metavar="SECONDS",
                   help="how old the --probe file's figures may be, seconds (default: 3600)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="do not measure this machine: use the links and overheads of --cluster FILE (or built-in "
                        "defaults) as they are")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    from ._progress import Phases
    from ._spec import load_model_spec
    from .launch import profile_model
    from .plan import apply_measurement, auto_threads, profile_rows, search
    from .split import params_on_meta
    from .train import verify_plans

    if args.verify and args.mode != "train":
        raise ValueError("--verify trains the candidates, so it needs --mode train; serve plans are ranked by the "
                         "cost model (use --verify 0)")
    if args.verify_steps is not None and args.verify_steps < 1:
        raise ValueError(f"--verify-steps must be >= 1, got {args.verify_steps}")
    verify = args.verify if args.mode == "train" else 0
    with Phases("stagewise plan") as phase:  # a spinner on a terminal; erased before the table prints
        phase("reading the cluster" if args.cluster else "detecting this machine")
        cluster = Cluster.read(args.cluster) if args.cluster else Cluster.detect()
        devices = args.devices or cluster.num_devices
        threads = args.threads or auto_threads(cluster, devices)
        calibration = None
        if args.calibrate:
            calibration = calibration_for(cluster, probe=args.probe, max_age_s=args.probe_max_age, phase=phase)
            cluster = apply_measurement(cluster, calibration.figures)
        phase(f"building {args.model} on the meta device")
        with params_on_meta():  # profiled unit by unit: only one unit's weights ever exist (plan.profile_chain)
            spec = load_model_spec(args.model)
        rows = profile_rows(args.profile_batch or args.global_batch)
        profile = profile_model(spec, rows=rows, repeats=args.repeats, threads=threads,
                                optimizer=args.optimizer if args.mode == "train" else None, model_name=args.model,
                                phase=phase)
        units = profile.units
        phase(f"searching layouts of {devices} device(s)")
        plans = search(profile, cluster, mode=args.mode, global_batch=args.global_batch, devices=args.devices,
                       optimizer=args.optimizer, limit=max(5, args.top, verify or 0))
        plans = [dataclasses.replace(p, model=args.model, threads=threads, calibration=calibration) for p in plans]
        if spec.dataset is None and verify != 0:
            if verify:
                raise ValueError(f"--verify trains the candidates, but {args.model} has no data set (ModelSpec."
                                 "dataset); add one, or pass --verify 0")
            verify = 0  # auto: nothing to train on
        extra = {} if args.verify_steps is None else {"steps": args.verify_steps}
        ranked = verify_plans(plans, model=args.model, count=verify, phase=phase, **extra)
        chosen = ranked[0] if ranked[0].verified else None
    shown = plans[:max(1, args.top)]
    print_plans(shown, title=f"{args.model}: best {args.mode} plans for {plans[0].devices} device(s) "
                             f"({len(units)} units, profiled at {', '.join(map(str, rows))} rows, {threads} "
                             f"thread(s) per rank)")
    if calibration is not None:
        print(f"calibrated on {calibration.describe()}")
    best = plans[0]
    if chosen is not None:
        print_verified(chosen)
        best = chosen
    print_memory(best)
    if args.json:
        best.to_json(args.json)
        print(f"{'chosen' if chosen is not None else 'best'} plan written to {args.json}")
    return 0


def print_verified(chosen: Plan, *, console: Any = None) -> None:
    """A table of the candidates verification trained (predicted and measured step time, how far the measurement
    missed the prediction) and which one was chosen."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="verified by training each candidate", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption_justify="left", caption="measured: the faster round's median step after the warm-up; "
                                                  "miss: measured / predicted - 1; the fastest measured is chosen")
    for col in ("#", "layout", "predicted ms", "measured ms", "miss"):
        table.add_column(col, justify="left" if col == "layout" else "right", no_wrap=col != "layout")
    for i, v in enumerate(chosen.verified, 1):
        mark = " (chosen)" if v.layout == chosen.layout_text() else ""
        table.add_row(str(i), escape(v.layout + mark), f"{v.predicted_step_s * 1e3:.2f}",
                      f"{v.measured_step_s * 1e3:.2f}", f"{v.miss:+.0%}")
    (console or Console(width=100)).print(table)


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
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the figures with this host's name and the time as a probe file, which "
                        "'stagewise plan --probe FILE' uses while it is young enough (--probe-max-age)")
    p.set_defaults(func=cmd_probe)
    return p


def cmd_probe(args: argparse.Namespace) -> int:
    from ._progress import Phases
    from .launch import calibrate
    from .plan import apply_measurement

    path = Path(args.cluster).absolute()  # the success line names the file wherever the command ran
    if args.hosts:
        return _probe_hosts(args, path)
    with Phases("stagewise probe") as phase:  # a spinner on a terminal; erased before the result prints
        phase(f"reading {path}" if path.exists() else "detecting this machine")
        cluster = Cluster.read(path) if path.exists() else Cluster.detect()
        backend = _backend(cluster, args.backend)
        phase(f"measuring links, all-reduce and contention between two processes ({backend}, "
              f"{args.repeats} repeats)")
        calibration = calibrate(nbytes=args.nbytes, repeats=args.repeats, timeout=args.timeout, backend=backend)
    measured = calibration.figures
    cluster = apply_measurement(cluster, measured)
    cluster.write(path)
    if args.json:
        calibration.write(args.json)
    print(f"latency {measured.latency_s * 1e6:.1f} us, bandwidth {measured.bandwidth / 1e9:.3f} GB/s, all-reduce "
          f"{measured.allreduce_bandwidth / 1e9:.3f} GB/s + {cluster.allreduce_latency * 1e6:.1f} us per ring step, "
          f"send {cluster.send_overhead * 1e6:.1f} us, receive {cluster.recv_overhead * 1e6:.1f} us, "
          f"{cluster.action_overhead * 1e6:.1f} us per compute action, compute contention x{cluster.contention:.2f} "
          f"({measured.nbytes} bytes, {measured.backend}); written to {path}"
          + (f" and {args.json}" if args.json else ""))
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
