"""``stagewise checkpoint info DIR`` and ``stagewise checkpoint export DIR --out FILE``: wired in by ``stagewise.cli``
through :func:`add_checkpoint_parser`."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_checkpoint_parser", "cmd_checkpoint_export", "cmd_checkpoint_info"]


def add_checkpoint_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``checkpoint`` (with ``info`` and ``export``) to the ``stagewise`` sub-commands."""
    p = subparsers.add_parser(
        "checkpoint", help="inspect or export a training checkpoint",
        description="Checkpoints are directories step-NNNNNNNN/ of safetensors files keyed by the original model's "
                    "FQNs plus a manifest.json; DIR is one of them, or the directory holding them (then the one "
                    "'latest' names).")
    sub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION")
    info = sub.add_parser("info", help="verify a checkpoint and print its parts, sizes and extras")
    info.add_argument("dir", metavar="DIR", help="a checkpoint directory, or the directory holding checkpoints")
    info.add_argument("--no-verify", dest="verify", action="store_false",
                      help="check file sizes only, not their sha256 (fast on big checkpoints)")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a table")
    info.set_defaults(func=cmd_checkpoint_info)
    export = sub.add_parser(
        "export", help="write the weights as one safetensors file (or a Hugging Face directory)",
        description="Merge every part's weights into one safetensors file keyed by the original FQNs (tied weights "
                    "under every name), loadable with model.load_state_dict(strict=True); with --pretrained-dir, "
                    "load them into MODEL and save_pretrained() it.")
    export.add_argument("dir", metavar="DIR", help="a checkpoint directory, or the directory holding checkpoints")
    export.add_argument("--out", default=None, metavar="FILE", help="the safetensors file to write")
    export.add_argument("--model", default=None, metavar="MODEL",
                        help="model factory ('file.py:factory' or 'package.module:factory'): check the export "
                             "against its state_dict() and take tied names from it")
    export.add_argument("--pretrained-dir", default=None, metavar="DIR",
                        help="Hugging Face models: load into MODEL and save_pretrained() here (needs --model)")
    export.set_defaults(func=cmd_checkpoint_export)
    return p


def cmd_checkpoint_info(args: argparse.Namespace) -> int:
    """Print a checkpoint's table (or manifest); exit 1 when a file does not match the manifest."""
    from rich.console import Console

    from ._export import format_info
    from ._format import CheckpointError
    from ._load import load_checkpoint

    try:
        ckpt = load_checkpoint(args.dir, verify="all" if args.verify else "size")
    except CheckpointError as exc:
        print(f"stagewise checkpoint info: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(ckpt.manifest, indent=1, sort_keys=True))
        return 0
    console = Console()
    console.print(format_info(ckpt))
    console.print("all files match the manifest (sha256)" if args.verify else "file sizes match the manifest "
                  "(sha256 not checked: --no-verify)")
    return 0


def cmd_checkpoint_export(args: argparse.Namespace) -> int:
    """Export a checkpoint's weights to ``--out`` and/or ``--pretrained-dir``."""
    from ._export import export_pretrained, export_state_dict
    from ._format import CheckpointError
    from ._load import load_checkpoint

    if args.out is None and args.pretrained_dir is None:
        raise ValueError("give --out FILE (a safetensors file) and/or --pretrained-dir DIR (with --model)")
    if args.pretrained_dir is not None and args.model is None:
        raise ValueError("--pretrained-dir needs --model: the Hugging Face model class to load the weights into")
    model = None
    if args.model is not None:
        from .._spec import load_model_spec

        model = load_model_spec(args.model).model
    try:
        ckpt = load_checkpoint(args.dir)
        if args.out is not None:
            out = export_state_dict(ckpt, args.out, model=model)
            print(f"exported step {ckpt.step} ({len(ckpt.fqns())} saved tensors) to {out}")
        if args.pretrained_dir is not None:
            assert model is not None
            where = export_pretrained(ckpt, model, args.pretrained_dir)
            print(f"saved step {ckpt.step} as a Hugging Face model in {where} (from_pretrained loads it)")
    except CheckpointError as exc:
        print(f"stagewise checkpoint export: error: {exc}", file=sys.stderr)
        return 1
    return 0
