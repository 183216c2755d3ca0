"""Training coverage: how many zoo models each framework trains exactly at 2 stages in 2 real processes (gloo).

Run: ``PYTHONPATH=src python bench/train_coverage.py [--models a,b,...] [--verbose]``. For every zoo model at its
default configuration (eval mode, dropout off), one forward + backward step on the first global batch of 4 samples
(2 microbatches of 2, GPipe) is compared with a single-process run of the same model on the same batch. A model counts
for a framework when the loss and EVERY parameter gradient match the reference with ``torch.allclose(rtol=1e-5,
atol=1e-5)`` (a parameter whose reference gradient is missing or zero must get no nonzero gradient).

- reference: a fresh model (eval mode) in this process, the batch ``global_batches(len(data), global_batch=4,
  steps=1, seed=0, shuffle=False)`` collated with ``default_collate``, ``model_loss(...).backward()``.
- stagewise: ``Trainer(TrainConfig(stages=2, microbatches=2, schedule="gpipe", steps=1, global_batch=4,
  optimizer="sgd", lr=1.0, dropout=False, shuffle=False))``; the gradient of a parameter is (initial - final weight)
  since SGD with lr=1 took one step. Every stage's saved copy of a weight is checked (tied weights too).
- torch: ``torch.distributed.pipelining.pipeline(model, mb_args, mb_kwargs, split_spec={cut: SplitPoint.BEGINNING})``
  at the cut Stagewise chose (first unit of its stage 1, ``@k`` stripped), ``pipe.build_stage(rank, cpu)``,
  ``ScheduleGPipe(stage, n_microbatches=2, loss_fn=...)`` in 2 gloo processes with a 60 s deadline (if Stagewise
  cannot split the model, torch gets the middle top-level child as the cut). The loss function
  rebuilds the model's output from the last stage's tensors and applies the same ``model_loss`` (the spec's loss, or
  ``output.loss`` for Hugging Face models); the schedule's ``target`` is the sample index (``arange(4)``, chunked like
  the inputs) so models with zero, one or several target tensors all fit torch's single-tensor target. Gradients of a
  weight replicated into both stages are summed (what a tied-weight all-reduce would give).

Children write JSON (status, loss) and safetensors (gradients); nothing is pickled. Any exception is a failure with a
one-line reason; Stagewise failures are also printed in full (last exception message) before the summary.
The last line is machine-readable: ``train_coverage stagewise=A/N torch_pipelining=B/N``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from stagewise._spec import ModelSpec, load_model_spec
from stagewise.launch import SpawnError, spawn
from stagewise.split import flatten, split, unflatten
from stagewise.train import TrainConfig, Trainer
from stagewise.train._data import global_batches, sample_to_call, split_microbatches
from stagewise.train._worker import example_batch, model_loss
from stagewise.zoo import ALL_MODELS

RTOL, ATOL = 1e-5, 1e-5
STAGES, MICROBATCHES, GLOBAL_BATCH = 2, 2, 4
TORCH_TIMEOUT = 60.0
STAGEWISE_TIMEOUT = 180.0
# The forkserver imports these once (the first spawn of a process decides the list, so main() spawns first): the
# Trainer's own list plus what every zoo child would otherwise import again (seconds each), and this script.
PRELOAD = ("torch", "torch.export", "torch._dynamo", "stagewise.train._worker", "stagewise.comm", "stagewise.zoo",
           "transformers", "transformers.modeling_utils", "sklearn.datasets", "__main__")
# A rank that lost its peer waits this long before reporting, so the peer's root cause is reported first.
COMM_ERROR_GRACE = 3.0
_COMM_ERROR = re.compile(r"gloo|Connection (closed|reset) by peer|Read error|DistBackendError|DistNetworkError")


class Mismatch(Exception):
    """Loss or gradients differ from the reference, or a result is missing."""


# ---------------------------------------------------------------------------------------------------------------------
# Shared by the parent and the torch ranks.


def factory_target(name: str) -> str:
    """``module:factory`` for a zoo entry, checked to import back to the same factory."""
    factory = ALL_MODELS[name]
    target = f"{factory.__module__}:{factory.__name__}"
    if getattr(importlib.import_module(factory.__module__), factory.__name__, None) is not factory:
        raise ValueError(f"zoo entry {name!r}: {target} does not import back to its factory")
    return target


def first_batch(spec: ModelSpec) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """The first global batch a run with shuffle=False reads, collated: ``(inputs, targets)``."""
    if spec.dataset is None:
        raise ValueError(f"model {spec.name!r} has no dataset")
    data = spec.dataset()
    indices = next(global_batches(len(data), global_batch=GLOBAL_BATCH, steps=1, seed=0, shuffle=False))
    inputs, targets = torch.utils.data.default_collate([data[i] for i in indices])
    return inputs, tuple(targets)


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name (tied aliases included) -> the first name of the same Parameter."""
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(p), name)
    return names


def _reason(exc: BaseException) -> str:
    """One line: the innermost cause's type and the first line of its message."""
    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    reason = text if isinstance(root, Mismatch) else f"{type(root).__name__}: {text}"
    return _short(reason)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Reference and comparison (parent process).


@dataclasses.dataclass(kw_only=True)
class Reference:
    """The single-process result every distributed run is compared with."""

    loss: float
    """Loss on the first global batch."""
    grads: dict[str, torch.Tensor]
    """Gradient by canonical parameter name (zeros where the parameter got none)."""
    initial: dict[str, torch.Tensor]
    """Initial weights by canonical parameter name."""
    names: dict[str, str]
    """Any parameter name -> its canonical name."""


def reference(target: str) -> Reference:
    torch.manual_seed(0)
    spec = load_model_spec(target)
    model = spec.model.eval()
    names = canonical_names(model)
    params = dict(model.named_parameters())
    initial = {n: p.detach().clone() for n, p in params.items()}
    inputs, targets = first_batch(spec)
    args, kwargs = sample_to_call(inputs)
    loss = model_loss(spec, model(*args, **kwargs), targets)
    loss.backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in params.items()}
    return Reference(loss=float(loss.detach()), grads=grads, initial=initial, names=names)


def stagewise_cut(target: str) -> str:
    """The first unit of Stagewise's stage 1, cut as the Trainer's workers cut (microbatch-shaped example)."""
    torch.manual_seed(0)
    spec = load_model_spec(target)
    spec.model.eval()
    args, kwargs, _ = example_batch(spec, GLOBAL_BATCH // MICROBATCHES)
    sm = split(spec.model, args, kwargs, stages=STAGES, by="params", model_name=target)
    if sm.partition.num_stages != STAGES:
        raise Mismatch(f"split gave {sm.partition.num_stages} stages")
    return sm.partition.stages[1].units[0].split("@")[0]


def compare_loss(ref: Reference, loss: float) -> None:
    if not torch.allclose(torch.tensor(loss, dtype=torch.float64), torch.tensor(ref.loss, dtype=torch.float64),
                          rtol=RTOL, atol=ATOL):
        raise Mismatch(f"loss {loss:.8g} != reference {ref.loss:.8g}")


def compare_grads(ref: Reference, got: dict[str, torch.Tensor]) -> None:
    """``got`` holds gradients by canonical name; a missing one counts as zero."""
    for name, g in ref.grads.items():
        h = got.get(name)
        if h is None:
            if g.any():
                raise Mismatch(f"no grad for {name}")
            continue
        compare_grad(ref, name, h)


def compare_grad(ref: Reference, name: str, h: torch.Tensor) -> None:
    g = ref.grads[name]
    if h.shape != g.shape:
        raise Mismatch(f"grad of {name} has shape {list(h.shape)}, expected {list(g.shape)}")
    if not torch.allclose(h.double(), g.double(), rtol=RTOL, atol=ATOL):
        raise Mismatch(f"grad of {name} differs by {(h.double() - g.double()).abs().max().item():.2e}")


def check_stagewise(target: str, ref: Reference) -> str:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="train-coverage-sw-") as out:
        config = TrainConfig(model=target, stages=STAGES, replicas=1, microbatches=MICROBATCHES, schedule="gpipe",
                             steps=1, global_batch=GLOBAL_BATCH, optimizer="sgd", lr=1.0, dropout=False,
                             shuffle=False, progress=False, log_every=0, out_dir=out)
        result = Trainer(config).fit(timeout=STAGEWISE_TIMEOUT)
        compare_loss(ref, result.losses[0])
        final = result.state_dict()
        copies = [load_file(str(p)) for p in sorted(result.out_dir.glob("stage*.safetensors"))]
    seen: dict[str, torch.Tensor] = {}
    for tensors in [final, *copies]:  # the merged view first, then every stage's own copy (tied weights)
        for key, weight in tensors.items():
            name = ref.names.get(key)
            if name is None:
                continue  # a buffer
            grad = ref.initial[name] - weight
            compare_grad(ref, name, grad)
            seen[name] = grad
    compare_grads(ref, seen)
    return "ok"


def _spawn_reason(exc: SpawnError) -> str:
    """The final exception line of the first failing rank's traceback (or the timeout)."""
    if exc.timed_out and not exc.failures:
        return str(exc).splitlines()[0]
    lines = [_last_exception_line(text) for text in exc.failures.values()] or [_last_exception_line(str(exc))]
    return next((line for line in lines if not _COMM_ERROR.search(line)), lines[0])


def _last_exception_line(traceback_text: str) -> str:
    """The last ``Type: message`` block of a traceback (message lines joined), or its last line."""
    lines = traceback_text.rstrip().splitlines()
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning|Mismatch)\b")
    for i in range(len(lines) - 1, -1, -1):
        if pattern.match(lines[i]):
            return " | ".join(line.strip() for line in lines[i:] if line.strip())
    return lines[-1].strip() if lines else "no traceback"


# ---------------------------------------------------------------------------------------------------------------------
# torch.distributed.pipelining (one spawn of 2 ranks per model).


def _torch_rank(rank: int, world_size: int, port: int, target: str, cut: str, out_dir: str) -> None:
    """One rank of a torch pipelining run; writes ``rank{r}.json`` (and ``rank{r}.safetensors`` gradients)."""
    import faulthandler

    faulthandler.enable()  # a rank that dies by a signal still leaves its Python stack in the stderr log
    out = Path(out_dir)
    status: dict[str, Any] = {"rank": rank, "ok": False}
    try:
        _torch_rank_body(rank, world_size, port, target, cut, out, status)
        status["ok"] = True
    except BaseException as exc:
        reason = _reason(exc)
        comm = bool(_COMM_ERROR.search(reason))
        if comm:
            time.sleep(COMM_ERROR_GRACE)
        status.update(reason=reason, comm_error=comm, failed_at=time.monotonic())
        raise
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(status))


def _torch_rank_body(rank: int, world_size: int, port: int, target: str, cut: str, out: Path,
                     status: dict[str, Any]) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.pipelining import ScheduleGPipe, SplitPoint, pipeline

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=TORCH_TIMEOUT))
    try:
        torch.manual_seed(0)
        spec = load_model_spec(target)
        model = spec.model.eval()
        names = canonical_names(model)
        flat_names = {n.replace(".", "_"): c for n, c in names.items()}
        inputs, targets = first_batch(spec)
        args, kwargs = sample_to_call(inputs)
        mb_args, mb_kwargs = sample_to_call(split_microbatches(inputs, MICROBATCHES)[0])
        with torch.no_grad():
            ref_leaves, out_tree = flatten(model(*mb_args, **mb_kwargs))

        def loss_fn(output: Any, index: torch.Tensor) -> torch.Tensor:
            if spec.loss is None and getattr(output, "loss", None) is not None:
                model_out = output
            else:
                leaves = flatten(output)[0]
                if len(leaves) != len(ref_leaves):
                    raise Mismatch(f"the last stage returns {len(leaves)} tensors, the model {len(ref_leaves)}")
                model_out = unflatten(out_tree, leaves)
            return model_loss(spec, model_out, tuple(t[index] for t in targets))

        pipe = pipeline(model, mb_args=mb_args, mb_kwargs=mb_kwargs or None, split_spec={cut: SplitPoint.BEGINNING})
        if pipe.num_stages != STAGES:
            raise Mismatch(f"split_spec at {cut!r} gave {pipe.num_stages} stages")
        stage = pipe.build_stage(rank, torch.device("cpu"))
        schedule = ScheduleGPipe(stage, n_microbatches=MICROBATCHES, loss_fn=loss_fn)
        index = torch.arange(GLOBAL_BATCH)
        losses: list[torch.Tensor] = []
        if rank == 0:
            schedule.step(*args, target=index, losses=losses, **kwargs)
        else:
            schedule.step(target=index, losses=losses)
        grads: dict[str, torch.Tensor] = {}
        for pname, p in stage.submod.named_parameters():
            canonical = names.get(pname) or flat_names.get(pname)
            if canonical is None:
                raise Mismatch(f"stage {rank} parameter {pname!r} is not a model parameter name")
            if p.grad is not None:
                grads[canonical] = p.grad.detach().contiguous()
        save_file(grads, str(out / f"rank{rank}.safetensors"))
        if stage.is_last:
            status["loss"] = float(torch.stack([x.detach() for x in losses]).mean())
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_torch(target: str, cut: str, ref: Reference) -> str:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="train-coverage-torch-") as tmp:
        out = Path(tmp)
        try:
            spawn(_torch_rank, STAGES, args=(target, cut, tmp), timeout=TORCH_TIMEOUT, preload=PRELOAD)
        except SpawnError as exc:
            failed = [s for s in (_read_json(out / f"rank{r}.json") for r in range(STAGES)) if s and not s["ok"]]
            if failed:  # the rank that failed first, not of a lost peer, is the likely root cause
                reason = min(failed, key=lambda s: (s["comm_error"], s["failed_at"]))["reason"]
            else:
                reason = _spawn_reason(exc)
            prefix = f"timed out after {TORCH_TIMEOUT:.0f} s; " if exc.timed_out else ""
            raise Mismatch(_short(prefix + reason)) from None
        status = [_read_json(out / f"rank{r}.json") for r in range(STAGES)]
        losses = [s["loss"] for s in status if s and "loss" in s]
        if len(losses) != 1:
            raise Mismatch(f"{len(losses)} ranks reported a loss")
        compare_loss(ref, losses[0])
        got: dict[str, torch.Tensor] = {}
        for r in range(STAGES):
            for name, g in load_file(str(out / f"rank{r}.safetensors")).items():
                got[name] = g if name not in got else got[name] + g
    compare_grads(ref, got)
    return "ok"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------------


def _attempt(fn: Callable[[], Any]) -> tuple[bool, Any, str]:
    """(ok, value or one-line reason, full final exception text)."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return True, fn(), ""
    except SpawnError as exc:
        full = _spawn_reason(exc)
        prefix = "timed out; " if exc.timed_out else ""
        return False, _short(prefix + full), full
    except Exception as exc:  # any failure counts against the framework
        return False, _reason(exc), f"{type(exc).__name__}: {exc}"


def _noop(rank: int, world_size: int, port: int) -> None:
    """Starts the forkserver with :data:`PRELOAD`."""


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (this process's and every child's, including the forkserver's) to ``path``."""
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: every zoo model)")
    parser.add_argument("--verbose", action="store_true", help="print timings per model")
    opts = parser.parse_args()
    names = opts.models.split(",") if opts.models else list(ALL_MODELS)
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        parser.error(f"unknown zoo models {unknown}; choose from {', '.join(ALL_MODELS)}")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    log = Path(tempfile.mkstemp(prefix="train-coverage-", suffix=".stderr.log")[1])
    with _stderr_to(log):
        run(names, verbose=opts.verbose, log=log)


def run(names: list[str], *, verbose: bool, log: Path) -> None:
    spawn(_noop, 1, timeout=300.0, preload=PRELOAD)
    print(f"# tolerance: torch.allclose(rtol={RTOL:g}, atol={ATOL:g}) on the loss and every parameter gradient; "
          f"{STAGES} stages, {MICROBATCHES} microbatches, batch {GLOBAL_BATCH}, gloo", flush=True)
    print(f"# stderr of this process and of every rank: {log}", flush=True)
    ours = theirs = 0
    details: list[str] = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        ok_ref, found, ref_full = _attempt(lambda: (target := factory_target(name), reference(target)))
        if not ok_ref:
            print(f"{name} stagewise=FAIL(reference: {found}) torch=FAIL(reference: {found})", flush=True)
            details.append(f"{name}: reference run failed: {ref_full}")
            continue
        target, ref = found
        ok_cut, cut, cut_full = _attempt(lambda: stagewise_cut(target))
        if not ok_cut:  # no cut of ours to mirror: torch gets the middle one of the model's top-level children
            children = [n for n, _ in load_model_spec(target).model.named_children()]
            cut = children[len(children) // 2] if children else ""
        t1 = time.perf_counter()
        s_ok, s_value, s_full = _attempt(lambda: check_stagewise(target, ref))
        ours += s_ok
        t2 = time.perf_counter()
        t_ok, t_value, _ = _attempt(lambda: check_torch(target, cut, ref))
        theirs += t_ok
        t3 = time.perf_counter()
        ours_text = "ok" if s_ok else f"FAIL({s_value})"
        torch_text = "ok" if t_ok else f"FAIL({t_value})"
        timing = f" [ref+cut {t1 - t0:.1f}s sw {t2 - t1:.1f}s torch {t3 - t2:.1f}s]" if verbose else ""
        print(f"{name} stagewise={ours_text} torch={torch_text}{timing}", flush=True)
        if not s_ok:
            details.append(f"{name}: stagewise: {s_full}")
        if not ok_cut:
            details.append(f"{name}: stagewise split (cut for torch): {cut_full}")
    for line in details:
        print(f"# detail {line}", flush=True)
    print(f"# {len(names)} models in {time.perf_counter() - start:.0f} s; torch {torch.__version__}", flush=True)
    print(f"train_coverage stagewise={ours}/{len(names)} torch_pipelining={theirs}/{len(names)}")


if __name__ == "__main__":
    sys.exit(main())
