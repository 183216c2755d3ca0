"""The ``stagewise`` command line: ``split``, ``train``, ``plan``, ``serve``... each maps onto the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._errors import StagewiseError

__all__ = ["main"]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_split(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split", help="cut a model into stages and print the stage table",
        description="Capture MODEL's forward pass, cut it into stages and print, per stage: the units (module FQNs) it "
                    "runs, its parameters, measured forward/backward time and the bytes crossing the cut after it.")
    p.add_argument("model", metavar="MODEL",
                   help="model factory: 'path/to/file.py:factory' or 'package.module:factory'")
    p.add_argument("--stages", type=int, default=2, help="number of pipeline stages (default: 2)")
    p.add_argument("--by", choices=["params", "time", "uniform"], default="params",
                   help="per-unit cost that the exact min-max cut balances; params, like train, so the table shows "
                        "what train runs (default: params)")
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
    from ._cli_config import add_config_arguments
    from .train import TrainConfig

    p = sub.add_parser(
        "train", help="train a model split into stages x replicas processes",
        description="Train MODEL pipeline-parallel (--stages) and data-parallel (--replicas) on local processes "
                    "(P x D of them, gloo on CPU). Under torchrun, runs as the rank torchrun started instead.")
    add_config_arguments(p, TrainConfig)  # every TrainConfig setting, its default and help from the field
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from ._cli_config import config_values
    from .train import TrainConfig, Trainer

    values = config_values(TrainConfig, args)
    plan = None
    if args.partition and _is_plan_file(args.partition):
        from .plan import Plan
        from .train import RuntimeConfig

        plan = Plan.from_json(args.partition)
        plan_kwargs = plan.to_train_kwargs()
        if values["threads"] != RuntimeConfig().threads:  # --threads N given: an explicit number wins over the plan's
            plan_kwargs.pop("threads")
        values.update(plan_kwargs)  # the plan decides the layout
        values["partition"] = None
        print(f"layout from {args.partition}: " + ", ".join(f"{k} {v}" for k, v in plan_kwargs.items()),
              file=sys.stderr)
    config = TrainConfig(**values)
    from .launch import torchrun_env

    torchrun = torchrun_env()  # the one read of torchrun's environment
    trainer = Trainer(config, torchrun=torchrun, plan=plan)
    if config.output.resume and (torchrun is None or torchrun.rank == 0):
        _say_resume(config.output.resume, (config.layout.stages, config.layout.replicas))
    spec = trainer.check() if torchrun is None else None  # every mistake one line here, before any rank starts
    result = trainer.fit()
    if torchrun is not None and torchrun.rank != 0:
        return 0
    if result.losses:
        where = f"weights in {result.out_dir}" if result.out_dir else "weights not kept: pass --out DIR to keep them"
        print(f"trained {len(result.losses)} steps: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} "
              f"({result.steps_per_s:.2f} steps/s); {where}")
    if result.plan_check is not None:  # the plan's predictions next to what this run measured
        for line in result.plan_check.lines():
            print(line)
        for line in result.plan_check.warnings():
            print(f"stagewise train: {line}", file=sys.stderr)
    saved = None
    if config.output.save_dir:
        from .checkpoint import latest_checkpoint

        saved = latest_checkpoint(config.output.save_dir)
        if saved is not None and result.stopped_by is None:
            print(f"saved checkpoint step {result.last_step} to {saved}")
    if config.output.trace:
        print(f"trace written to {config.output.trace} (trace.json, timeline.png)")
    if result.stopped_by is not None:  # SIGINT/SIGTERM: every rank ended after the same step
        where = f"checkpoint at {saved}" if saved is not None else "no checkpoint: pass --save DIR to keep one"
        print(f"stagewise train: {result.stop_reason}: stopped at step {result.last_step} of {config.steps} "
              f"({where})", file=sys.stderr)
        return 128 + result.stopped_by
    if spec is not None and spec.evaluate is not None:
        scores = spec.evaluate(result.load_into(spec.model))
        print("held-out " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return 0


def _say_resume(resume: str, layout: tuple[int, int]) -> None:
    """Name the checkpoint a run resumes from, and say when its layout differs from this run's."""
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(resume, verify="size")
    saved = ckpt.extra.get("layout", {})
    before = (saved.get("stages"), saved.get("replicas"))
    change = ""
    if None not in before and before != layout:
        change = f" (layout changed from ({before[0]},{before[1]}) to ({layout[0]},{layout[1]}))"
    print(f"resuming from {ckpt.path} step {ckpt.step}{change}", file=sys.stderr)


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
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; full tracebacks")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from ._plan_cli import add_plan_parser, add_probe_parser
    from .checkpoint import add_checkpoint_parser
    from .serve import add_generate_parsers, add_infer_parser, add_serve_parser, add_worker_parser

    _add_split(sub)
    _add_train(sub)
    add_plan_parser(sub)
    add_probe_parser(sub)
    add_checkpoint_parser(sub)
    add_serve_parser(sub)
    add_infer_parser(sub)
    add_worker_parser(sub)
    add_generate_parsers(sub)
    for command in sub.choices.values():  # -v also after the command (SUPPRESS: absent there keeps the one before)
        _show_defaults(command)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log debug messages; full tracebacks")
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's help ends with its default: the hand-written ones that do not say it get it appended."""
    from ._cli_config import shown

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # checkpoint info / export
            for nested in action.choices.values():
                _show_defaults(nested)
        elif (action.option_strings and action.help and action.default is not argparse.SUPPRESS
                and "default" not in action.help):
            action.help += f" (default: {shown(action.default)})".replace("%", "%%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:  # Ctrl-C outside a run that handles it itself (train stops at a step): one line
        why = f" ({exc})" if str(exc) else ""
        print(f"stagewise {args.command}: interrupted{why}", file=sys.stderr)
        return 130
    except Exception as exc:  # one line; the traceback only with -v
        if args.verbose:
            traceback.print_exc()
        print(f"stagewise {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """``exc`` as one line. Our own errors (and ValueError/OSError, which name what to change) speak for themselves;
    anything else was raised by the user's code (a model factory, a data set): name its file and line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, StagewiseError | ValueError | OSError | TimeoutError):
        return text
    libraries = (str(Path(__file__).parent), sys.prefix, sys.base_prefix)  # ours, installed packages, the stdlib
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(libraries)]
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {text}{where} (run with -v for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
