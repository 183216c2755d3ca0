"""Split coverage: how many zoo models each splitter cuts into 2 stages that reproduce the model exactly.

Run: ``PYTHONPATH=src python bench/split_coverage.py [--models a,b,...]``. For every zoo model at its default
configuration (eval mode, dropout off), both frameworks cut it into 2 stages at the same place (the first unit of our
second stage, by the ``params`` cost), the stages run one after the other in this process, and the model counts for a
framework when every output leaf matches the model's (max abs diff <= 1e-6) and every parameter gradient matches
(rtol 1e-5, atol 4e-5) for the loss ``spec.loss``/``output.loss`` plus the mean of every float output.

- stagewise: ``split(spec, stages=2)``, then ``SplitModel.run``.
- torch: ``torch.distributed.pipelining.pipeline(model, mb_args, mb_kwargs, split_spec={cut: SplitPoint.BEGINNING})``;
  its stage modules ``pipe.get_stage_module(i)`` run in sequence, wired as ``pipe.split_gm``'s graph wires them (each
  stage's outputs feed the next). Weights a Pipe replicates into several stages get the sum of their copies'
  gradients (what its optimizer step would all-reduce). Any exception is a failure, with a one-line reason.

The last line is machine-readable: ``split_coverage stagewise=A/N torch_pipelining=B/N``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import operator
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stagewise._spec import ModelSpec
from stagewise.split import flatten, split, unflatten
from stagewise.zoo import ALL_MODELS

OUT_ATOL = 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 4e-5


class Mismatch(Exception):
    """Outputs or gradients differ from the reference."""


def _targets(spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    if spec.loss is None or spec.dataset is None:
        return ()
    data = spec.dataset()
    batch = flatten((spec.args, spec.kwargs))[0][0].shape[0]
    first = [data[i][1] for i in range(batch)]
    return tuple(torch.stack([sample[j] for sample in first]) for j in range(len(first[0])))


def _loss(spec: ModelSpec, out: Any, targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
    main = out.loss if spec.loss is None else spec.loss(out, *targets)
    return main + sum(t.float().mean() for t in flatten(out)[0] if t.is_floating_point() and t.requires_grad)


def _fresh(name: str) -> ModelSpec:
    spec = ALL_MODELS[name]()
    spec.model.eval()
    for p in spec.model.parameters():
        p.grad = None
    return spec


def _reference(spec: ModelSpec, targets: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], Any, dict[int, Any]]:
    """Output leaves, output tree spec and parameter gradients (by Parameter id) of the unsplit model."""
    out = spec.model(*spec.args, **spec.kwargs)
    _loss(spec, out, targets).backward()
    grads = {id(p): None if p.grad is None else p.grad.clone() for p in spec.model.parameters()}
    for p in spec.model.parameters():
        p.grad = None
    leaves, tree = flatten(out)
    return [t.detach() for t in leaves], tree, grads


def _compare_outputs(ref: list[torch.Tensor], got: list[Any]) -> None:
    if len(got) != len(ref):
        raise Mismatch(f"{len(got)} output tensors, the model returns {len(ref)}")
    for i, (x, y) in enumerate(zip(ref, got)):
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
            raise Mismatch(f"output {i} is {getattr(y, 'dtype', type(y))}{list(getattr(y, 'shape', []))}, "
                           f"expected {x.dtype}{list(x.shape)}")
        diff = (x - y.detach()).abs().max().item() if x.is_floating_point() and x.numel() else float(
            not torch.equal(x, y))
        if diff > OUT_ATOL:
            raise Mismatch(f"output {i} differs by {diff:.2e}")


def _compare_grads(model: nn.Module, ref: dict[int, Any], got: dict[int, Any]) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    for pid, g in ref.items():
        h = got.get(pid)
        if g is None or not g.any():
            if h is not None and h.any():
                raise Mismatch(f"grad of {names[pid]} is nonzero, the model's is not")
            continue
        if h is None:
            raise Mismatch(f"no grad for {names[pid]}")
        if not torch.allclose(h, g, rtol=GRAD_RTOL, atol=GRAD_ATOL):
            raise Mismatch(f"grad of {names[pid]} differs by {(h - g).abs().max().item():.2e}")


def check_stagewise(name: str) -> tuple[str, str]:
    """Split into 2 stages, run them, compare. Returns (cut unit FQN, "ok")."""
    spec = _fresh(name)
    targets = _targets(spec)
    ref, _, ref_grads = _reference(spec, targets)
    sm = split(spec, stages=2, by="params")
    if sm.partition.num_stages != 2:
        raise Mismatch(f"{sm.partition.num_stages} stages")
    out = sm.run(spec.args, spec.kwargs)
    _compare_outputs(ref, flatten(out)[0])
    _loss(spec, out, targets).backward()
    _compare_grads(spec.model, ref_grads, {id(p): p.grad for p in spec.model.parameters()})
    return sm.partition.stages[1].units[0].split("@")[0], "ok"


def _run_pipe(pipe: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the Pipe's stage modules in sequence, wired by ``pipe.split_gm``'s graph (autograd flows through)."""
    from inspect import Parameter, Signature

    gm = pipe.split_gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if kwargs:  # bind keyword inputs to the placeholders as Pipe.forward does
        sig = Signature([Parameter(n.target, Parameter.POSITIONAL_OR_KEYWORD) for n in placeholders])
        bound = sig.bind_partial(*args, **kwargs)
        values = [bound.arguments.get(n.target) for n in placeholders]
    else:
        values = list(args)
    env: dict[Any, Any] = dict(zip(placeholders, values))
    stage_index = {id(pipe.get_stage_module(i)): i for i in range(pipe.num_stages)}
    ran = []

    def load(a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: env[n])

    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            ran.append(stage_index[id(module)])
            env[node] = module(*load(node.args), **load(node.kwargs))
        elif node.op == "call_function" and node.target is operator.getitem:
            env[node] = operator.getitem(*load(node.args))
        elif node.op == "output":
            if ran != list(range(pipe.num_stages)):
                raise Mismatch(f"stage modules ran in order {ran}")
            return load(node.args[0])
        elif node.op != "placeholder":
            raise Mismatch(f"unexpected node {node.op} {node.target} in the pipe graph")
    raise Mismatch("the pipe graph has no output")


def check_torch(name: str, cut: str) -> str:
    from torch.distributed.pipelining import SplitPoint, pipeline

    spec = _fresh(name)
    targets = _targets(spec)
    ref, ref_tree, ref_grads = _reference(spec, targets)
    pipe = pipeline(spec.model, mb_args=spec.args, mb_kwargs=spec.kwargs or None,
                    split_spec={cut: SplitPoint.BEGINNING})
    if pipe.num_stages != 2:
        raise Mismatch(f"split_spec at {cut!r} gave {pipe.num_stages} stages")
    stages = [pipe.get_stage_module(i) for i in range(2)]
    for m in stages:
        for p in m.parameters():
            p.grad = None
    flat = flatten(_run_pipe(pipe, spec.args, spec.kwargs))[0]
    _compare_outputs(ref, flat)
    _loss(spec, unflatten(ref_tree, flat), targets).backward()
    # Gradients by the model's parameter each stage parameter stands for (a replicated weight sums its copies).
    aliases: dict[str, int] = {n: id(p) for n, p in spec.model.named_parameters(remove_duplicate=False)}
    got: dict[int, Any] = {}
    for m in stages:
        for pname, p in m.named_parameters():
            pid = aliases.get(pname)
            if pid is None:
                raise Mismatch(f"stage parameter {pname!r} is not a model parameter name")
            if p.grad is not None:
                got[pid] = p.grad.clone() if got.get(pid) is None else got[pid] + p.grad
    _compare_grads(spec.model, ref_grads, got)
    return "ok"


def _reason(exc: BaseException) -> str:
    """One line: the exception type and the first line of the innermost cause's message."""
    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    if len(text) > 120 and ". " in text[:200]:
        text = text[: text.index(". ") + 1]  # the first sentence says it
    reason = f"{type(root).__name__}: {text}" if not isinstance(root, Mismatch) else text
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _attempt(fn: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return True, fn()
    except Exception as exc:  # any failure counts against the framework
        return False, _reason(exc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: every zoo model)")
    opts = parser.parse_args()
    names = opts.models.split(",") if opts.models else list(ALL_MODELS)
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    ours = theirs = 0
    start = time.perf_counter()
    for name in names:
        ok, value = _attempt(lambda: check_stagewise(name))
        if ok:
            cut, _ = value
            ours += 1
        else:
            cut = None
        ours_text = "ok" if ok else f"FAIL({value})"
        if cut is None:  # no cut of ours to mirror: use the second half of the model's top-level children
            children = [n for n, _ in _fresh(name).model.named_children()]
            cut = children[len(children) // 2] if children else ""
        t_ok, t_value = _attempt(lambda: check_torch(name, cut))
        theirs += t_ok
        torch_text = "ok" if t_ok else f"FAIL({t_value})"
        print(f"{name} stagewise={ours_text} torch={torch_text}", flush=True)
    print(f"# {len(names)} models in {time.perf_counter() - start:.0f} s; torch {torch.__version__}", flush=True)
    print(f"split_coverage stagewise={ours}/{len(names)} torch_pipelining={theirs}/{len(names)}")


if __name__ == "__main__":
    sys.exit(main())
