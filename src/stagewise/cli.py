"""The ``stagewise`` command line: ``split``, ``train``, ``plan``, ``serve``... each maps onto the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split", help="cut a model into stages and print the stage table",
        description="Capture MODEL's forward pass, cut it into stages and print, per stage: the units (module FQNs) it "
                    "runs, its parameters, measured forward/backward time and the bytes crossing the cut after it.")
    p.add_argument("model", metavar="MODEL", help="model factory: 'path/to/file.py:factory' or 'package.module:factory'")
    p.add_argument("--stages", type=int, default=2, help="number of pipeline stages (default: 2)")
    p.add_argument("--by", choices=["time", "params", "uniform"], default="time",
                   help="per-unit cost that the exact min-max cut balances (default: time)")
    p.add_argument("--cuts", type=_csv, default=None, metavar="FQN,...",
                   help="cut before each listed unit instead of balancing (each names the first unit of a stage)")
    p.add_argument("--submodels", type=_csv, default=None, metavar="FQN,...",
                   help="sub-model split: each named sub-module becomes its own stage")
    p.add_argument("--tasks", type=_csv, default=None, metavar="FQN,...",
                   help="task split: the trunk is cut into --stages stages, then one stage per named head")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per unit after one warm-up (default: 3)")
    p.add_argument("--eval", action="store_true", help="capture the model in eval mode (no dropout)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the partition as JSON to FILE")
    p.set_defaults(func=_cmd_split)


def _cmd_split(args: argparse.Namespace) -> int:
    from ._spec import load_model_spec
    from .report import print_partition
    from .split import split

    spec = load_model_spec(args.model)
    if args.eval:
        spec.model.eval()
    sm = split(spec, stages=args.stages, by=args.by, cuts=args.cuts, submodels=args.submodels, tasks=args.tasks,
               repeats=args.repeats, profile=True, model_name=args.model)
    print_partition(sm.partition)
    if args.json:
        sm.partition.to_json(args.json)
        print(f"partition written to {args.json}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train._config import OPTIMIZERS, SCHEDULES

    p = sub.add_parser(
        "train", help="train a model split into stages x replicas processes",
        description="Train MODEL pipeline-parallel (--stages) and data-parallel (--replicas) on local processes "
                    "(P x D of them, gloo on CPU). Under torchrun, runs as the rank torchrun started instead.")
    p.add_argument("model", metavar="MODEL", help="model factory: 'path/to/file.py:factory' or 'package.module:factory'"
                   "; its ModelSpec must have a dataset")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages P (default: 2)")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel replicas D (default: 1)")
    p.add_argument("--microbatches", type=int, default=4, help="microbatches per replica per step (default: 4)")
    p.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default: 1f1b)")
    p.add_argument("--stages-per-rank", type=int, default=1, help="virtual stages per process (interleaved only)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps (default: 10)")
    p.add_argument("--global-batch", type=int, default=32, help="samples per step over all replicas (default: 32)")
    p.add_argument("--by", choices=["time", "params", "uniform"], default="params",
                   help="cost that balances the cut (default: params)")
    p.add_argument("--cuts", type=_csv, default=None, metavar="FQN,...", help="cut before these units instead")
    p.add_argument("--plan", dest="partition", default=None, metavar="FILE",
                   help="a plan from 'stagewise plan --json' (sets layout, cut, microbatches, schedule) or a partition "
                        "from 'stagewise split --json' (sets the cut)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="optimizer of every stage (default: adam)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: 0)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="LR schedule")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps for --lr-schedule cosine")
    p.add_argument("--clip-grad-norm", type=float, default=None, help="clip gradients to this global norm")
    p.add_argument("--loss-reduction", choices=["mean", "sum"], default="mean",
                   help="whether the loss averages (mean) or adds (sum) over samples (default: mean)")
    p.add_argument("--data", choices=["shard", "replicate"], default="shard",
                   help="each replica loads only its shard, or a full copy (default: shard)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="read the data set in order")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of torch (default: 0)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per loading rank (default: 0)")
    p.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="capture the model in eval mode (deterministic, no dropout)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds any wait may take (default: 30)")
    p.add_argument("--threads", type=int, default=1, help="compute threads per process (default: 1)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                   help="where stages compute: cpu, cuda (GPUs shared by ranks go through pinned host memory), or "
                        "auto (cuda when available) (default: cpu)")
    p.add_argument("--out", dest="out_dir", default=None, metavar="DIR",
                   help="write final weights (safetensors by FQN) and losses here")
    p.add_argument("--save", dest="save_dir", default=None, metavar="DIR",
                   help="checkpoint root: weights + optimizer + RNG + data position by FQN (safetensors + manifest)")
    p.add_argument("--save-every", type=int, default=0, help="save every N steps (default: only at the end)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default: 3)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint (root or step directory), in any stages x replicas layout")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="record every action of every rank: DIR/trace.json (Chrome/Perfetto) and DIR/timeline.png")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train import TrainConfig, Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if args.partition and _is_plan_file(args.partition):
        from .plan import Plan

        values.update(Plan.from_json(args.partition).to_train_kwargs())  # the plan decides the layout
        values["partition"] = None
    config = TrainConfig(**values)
    from .launch import torchrun_env

    torchrun = torchrun_env()  # the one read of torchrun's environment
    result = Trainer(config, torchrun=torchrun).fit()
    if torchrun is not None and torchrun.rank != 0:
        return 0
    if result.losses:
        print(f"trained {len(result.losses)} steps: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} "
              f"({result.steps_per_s:.2f} steps/s); weights in {result.out_dir}")
    if result.stopped_by is not None:  # SIGINT/SIGTERM: every rank ended after the same step
        from .checkpoint import latest_checkpoint

        saved = latest_checkpoint(config.save_dir) if config.save_dir else None
        where = f"checkpoint at {saved}" if saved is not None else "no checkpoint: pass --save DIR to keep one"
        print(f"stagewise train: {result.stop_reason}: stopped at step {result.last_step} of {config.steps} "
              f"({where})", file=sys.stderr)
        return 128 + result.stopped_by
    if torchrun is None:
        from ._spec import load_model_spec

        spec = load_model_spec(config.model)
        if spec.evaluate is not None:
            scores = spec.evaluate(result.load_into(spec.model))
            print("held-out " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return 0


def _is_plan_file(path: str) -> bool:
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read plan/partition file {path!r}: {exc}") from None
    return isinstance(data, dict) and "schedule" in data and "cut" in data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagewise", description="Split a PyTorch model into stages, train it across processes, serve it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from ._plan_cli import add_plan_parser, add_probe_parser
    from .checkpoint._cli import add_checkpoint_parser
    from .serve._cli import add_infer_parser, add_serve_parser

    _add_split(sub)
    _add_train(sub)
    add_plan_parser(sub)
    add_probe_parser(sub)
    add_checkpoint_parser(sub)
    add_serve_parser(sub)
    add_infer_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"stagewise {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
