"""Tiny-GPT training throughput on CUDA with 1 and 2 pipeline stages (the GPU path, issue #4).

Run: ``PYTHONPATH=src python bench/gpu_steps.py [--steps 30] [--device cuda]``.

Model ``stagewise.zoo.gpt:tiny_gpt`` (4 blocks, width 32, sequence 16), global batch 32 cut into 4 microbatches,
1F1B, Adam (lr 1e-3), no dropout, one process per stage. On a machine with one GPU the 2-stage run puts both ranks on
it (gloo staged through pinned host memory); with 2+ GPUs it uses NCCL. steps/s is ``Trainer``'s own measure: the
timed loop of every step (data, pipeline, gradient all-reduce, optimizer, loss all-reduce), after process start, model
capture and CUDA initialisation.

The last line is ``gpu_steps stages1=X stages2=Y`` (steps/s).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from stagewise.train import TrainConfig, Trainer  # noqa: E402


def measure(stages: int, *, steps: int, device: str) -> float:
    config = TrainConfig(model="stagewise.zoo.gpt:tiny_gpt", stages=stages, microbatches=4, global_batch=32,
                         schedule="1f1b", steps=steps, dropout=False, progress=False, log_every=0, device=device,
                         timeout=60.0)
    trainer = Trainer(config)
    result = trainer.fit()
    print(f"stages={stages}: {trainer.devices.describe()}; {result.steps_per_s:.2f} steps/s; "
          f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}", flush=True)
    return result.steps_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default: 30)")
    parser.add_argument("--device", choices=["cuda", "cpu", "auto"], default="cuda", help="default: cuda")
    args = parser.parse_args()
    one = measure(1, steps=args.steps, device=args.device)
    two = measure(2, steps=args.steps, device=args.device)
    print(f"gpu_steps stages1={one:.2f} stages2={two:.2f}", flush=True)


if __name__ == "__main__":
    main()
