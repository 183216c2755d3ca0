"""Peak activation memory of pipeline stage 0 under GPipe and 1F1B (2 stages, 8 microbatches, 2 real processes).

Run: ``PYTHONPATH=src python bench/train_memory.py [--steps 2]``.

Model and cut as ``bench/train_pipeline.py``: 8 x (Linear(1024, 1024) + ReLU), MSE loss, global batch 64 in 8
microbatches of 8, 2 stages cut before the 5th Linear (unit ``"8"``). Each rank builds its stage exactly as the
Trainer's worker does (``split(..., cuts=["8"])``, ``stages_for``, ``add_communication(build(...))``) and runs the
runtime's ``PipelineExecutor`` over gloo for ``--steps`` steps per schedule (no optimizer: memory only).

What is measured, on every rank, for the last step:
- ``peak MB``: the most bytes of tensors that autograd holds saved for backward at any moment, counted with
  ``torch.autograd.graph.saved_tensors_hooks``: a saved tensor counts its storage once however many graph nodes save
  it (a ReLU output is saved by the ReLU and by the next Linear), is released when the graph node that packed it is
  freed, and parameters (and views of them) are not counted. The microbatch input that the first Linear saves counts
  (each microbatch is cloned into its own storage, so a saved input counts its rows, not the whole batch's).
- ``peak contexts``: the most (stage, microbatch) forward contexts the executor held alive between actions
  (``PipelineExecutor._ctx``), next to ``stagewise.schedule.peak_activations`` (the schedule's theory: GPipe M, 1F1B
  ``min(M, P - stage)``).

The last line is ``train_memory gpipe_mb=A 1f1b_mb=B`` (stage 0's peak saved-activation MB; B ~ A / 4 is expected,
since stage 0 holds 2 microbatches under 1F1B and 8 under GPipe).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch starts its thread pool; forked ranks inherit it
os.environ["MKL_NUM_THREADS"] = "1"

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import deep_mlp  # noqa: E402

from stagewise.comm import DistTransport  # noqa: E402
from stagewise.launch import spawn  # noqa: E402
from stagewise.runtime import PipelineExecutor  # noqa: E402
from stagewise.schedule import Action, add_communication, build, peak_activations, validate  # noqa: E402
from stagewise.split import SavedBytes, split  # noqa: E402

STAGES, MICROBATCHES, BATCH, HIDDEN, LAYERS = 2, 8, 64, 1024, 8
CUT = "8"
SCHEDULES = ("gpipe", "1f1b")
PRELOAD = ("torch", "torch.export", "torch._dynamo", "stagewise.split", "stagewise.runtime", "stagewise.comm")


class CountingExecutor(PipelineExecutor):
    """The runtime's executor, noting how many forward contexts are alive after each action."""

    peak_ctx = 0

    def _dispatch(self, action: Action) -> None:
        super()._dispatch(action)
        self.peak_ctx = max(self.peak_ctx, len(self._ctx))


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    transport = DistTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=60.0)
    try:
        spec = deep_mlp(layers=LAYERS, hidden=HIDDEN, batch=BATCH // MICROBATCHES)
        sm = split(spec.model, spec.args, stages=STAGES, cuts=[CUT])
        _, stages = sm.stages_for(spec.args, {})
        mine = {rank: stages[rank]}
        params = [p for p in stages[rank].parameters() if p.requires_grad]
        data = spec.dataset() if spec.dataset is not None else None
        assert data is not None
        xs, ys = data.inputs[0][:BATCH], data.targets[0][:BATCH]
        # Each microbatch in its own storage: a chunk is a view of the whole batch, and the first Linear's saved input
        # would otherwise count the whole batch (which the Trainer holds for the step under any schedule anyway).
        x_mb = [c.clone() for c in xs.chunk(MICROBATCHES)]
        y_mb = [c.clone() for c in ys.chunk(MICROBATCHES)]  # the MSE loss saves its target: same reason
        needed = stages[rank].spec.inputs
        inputs = [{name: x_mb[m] for name in needed} for m in range(MICROBATCHES)]

        def loss_fn(outputs: list[Any], m: int) -> torch.Tensor:
            return F.mse_loss(outputs[0], y_mb[m])

        result: dict[str, Any] = {}
        for name in SCHEDULES:
            schedule = add_communication(build(name, ranks=STAGES, microbatches=MICROBATCHES))
            validate(schedule)
            executor = CountingExecutor(stages=mine, schedule=schedule, transport=transport,
                                        peers=list(range(STAGES)), num_stages=STAGES, loss_fn=loss_fn, timeout=60.0)
            meter = SavedBytes(params)
            t0 = time.perf_counter()
            for _ in range(steps):
                meter.reset()
                executor.peak_ctx = 0
                with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
                    executor.run(inputs, loss_scale=1.0 / MICROBATCHES)
                for p in params:
                    p.grad = None
            result[name] = {"peak_mb": meter.peak / 2**20, "live_after_mb": meter.live / 2**20,
                            "peak_ctx": executor.peak_ctx, "theory": peak_activations(schedule)[rank],
                            "seconds": time.perf_counter() - t0}
            transport.barrier(timeout=60.0)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="steps per schedule (the last one is reported)")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit("need --steps >= 1")
    start = time.perf_counter()
    per_mb = (BATCH // MICROBATCHES) * HIDDEN * 4 / 2**20
    print(f"model: {LAYERS} x Linear({HIDDEN},{HIDDEN})+ReLU, {MICROBATCHES} microbatches of {BATCH // MICROBATCHES}, "
          f"{STAGES} stages cut at unit {CUT!r}; one (8, {HIDDEN}) fp32 activation = {per_mb:.4f} MB", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-memory-") as tmp:
        spawn(_rank_main, STAGES, args=(tmp, args.steps), timeout=300, preload=PRELOAD)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(STAGES)]
    for rank, res in enumerate(ranks):
        for name in SCHEDULES:
            r = res[name]
            print(f"stage {rank} {name:5s}: peak saved activations {r['peak_mb']:.3f} MB "
                  f"({r['peak_mb'] / per_mb:.1f} x one activation; {r['live_after_mb']:.3f} MB left after the step), "
                  f"peak live contexts {r['peak_ctx']} (schedule theory {r['theory']}), {r['seconds']:.2f} s",
                  flush=True)
    gpipe, one = ranks[0]["gpipe"]["peak_mb"], ranks[0]["1f1b"]["peak_mb"]
    print(f"stage 0: 1f1b / gpipe = {one / gpipe:.3f} (expected {2 / MICROBATCHES:.3f}); "
          f"total bench time {time.perf_counter() - start:.1f} s")
    print(f"train_memory gpipe_mb={gpipe:.3f} 1f1b_mb={one:.3f}")


if __name__ == "__main__":
    main()
