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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagewise", description="Split a PyTorch model into stages, train it across processes, serve it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_split(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"stagewise {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
