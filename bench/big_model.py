"""A model too big for four full copies on this machine: trained with 4 stages and served through 4 stages.

Run: ``PYTHONPATH=src python bench/big_model.py`` (``--layers 1 --hidden 512`` for a quick smoke run).

The model is an unmodified Hugging Face ``LlamaForCausalLM`` built from its config (hidden 4096, intermediate 11008,
8 layers, 32 heads, vocabulary 32000, untied head): 1.88 G parameters, 7.5 GB in float32, so four full copies (30 GB)
do not fit in 24 GiB. Nobody builds it whole:

1. train: ``Trainer`` with 4 stages, ``init="seeded"`` (every rank builds the model on the meta device and initialises
   only its own stage, seeded by module name), SGD, 2 steps, global batch 4 in 2 microbatches of 16 tokens, saving a
   checkpoint (each rank writes its own stage's tensors).
2. serve: ``stagewise serve`` (a real subprocess) from that checkpoint with 4 stages: each worker reads only its
   stage's tensors; the gateway holds no weights. One request of 16 tokens; its logits must be finite, of shape
   (1, 16, vocab), and equal to the logits the same weights give through ``SplitModel.run`` in this process (built
   stage by stage from the checkpoint after the server stopped).

Memory is read from the kernel: every process below this one is polled for ``VmHWM`` (its peak RSS) and ``VmRSS``.
``peak_ratio`` = max over training ranks of (peak RSS - idle worker RSS) / (the rank's weights + gradients +
optimizer state; SGD has none), where the idle worker RSS is a process that imported what a worker imports; ranks are
told apart by their pids (the forkserver forks rank 0 first). ``gateway_mb`` is the serving gateway process's RSS
once ready; ``load_s`` the time from starting the server to ready (each worker reads its ~1.9 GB stage from the
checkpoint).

Last line: ``big_model params_gb=G stages=4 train_ok=1 serve_ok=1 peak_ratio=R gateway_mb=M load_s=T``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

from stagewise._procs import descendants

HERE = Path(__file__).resolve()
_ENV = "STAGEWISE_BIG_MODEL"
"""The model's size travels to the worker processes (which call the factory) in this environment variable."""
SEQ, BATCH = 16, 4


def big_llama() -> Any:
    """The bench model (size from ``STAGEWISE_BIG_MODEL``, JSON), random token data with labels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stagewise._spec import ModelSpec

    size = json.loads(os.environ.get(_ENV, "{}"))
    hidden, layers = size.get("hidden", 4096), size.get("layers", 8)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=size.get("intermediate", hidden * 11008 // 4096),
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                         num_key_value_heads=max(1, hidden // 128), vocab_size=size.get("vocab", 32000),
                         max_position_embeddings=64, tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (64, SEQ), generator=g)
    data = [{"input_ids": t, "labels": t} for t in tokens]
    return ModelSpec(model=model, kwargs={"input_ids": tokens[:2], "labels": tokens[:2]}, dataset=lambda: data,
                     name="big_llama")


class MemoryWatch:
    """Polls every process below this one: peak RSS (VmHWM), current RSS and depth below this process, by pid."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.peak: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self.depth: dict[int, int] = {}
        """1 for this process's children (the forkserver), 2 for theirs (the ranks)..."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period_s,), daemon=True)
        self._thread.start()

    def _run(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            for pid, depth in descendants(os.getpid()).items():
                status = _status(pid)
                if status:
                    self.peak[pid] = max(self.peak.get(pid, 0), status.get("VmHWM", 0))
                    self.rss[pid] = status.get("VmRSS", 0)
                    self.depth[pid] = depth

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def idle_worker_rss() -> int:
    """RSS of a process that imported what a training or serving worker imports, before it builds anything."""
    code = ("import torch, transformers, stagewise.train._worker, stagewise.serve._worker, stagewise.weights, "
            "stagewise.split; print(open('/proc/self/status').read())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(HERE.parent.parent / "src"))).stdout
    return next(int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("VmRSS:"))


def stage_bytes(model: str) -> list[int]:
    """Each of the 4 stages' parameter bytes, from a split on the meta device (nothing allocated)."""
    from stagewise._spec import load_model_spec
    from stagewise.split import params_on_meta, split

    with params_on_meta():
        spec = load_model_spec(model)
    sm = split(spec.model, spec.args, {"input_ids": spec.kwargs["input_ids"][:BATCH // 2]}, stages=4)
    return [sm.param_bytes([s]) for s in range(4)]


def train(model: str, save: Path) -> tuple[bool, MemoryWatch]:
    from stagewise.train import TrainConfig, Trainer

    watch = MemoryWatch()
    try:
        result = Trainer(TrainConfig(model=model, stages=4, microbatches=2, global_batch=BATCH, steps=2,
                                     optimizer="sgd", lr=1e-3, init="seeded", save_dir=str(save), timeout=600,
                                     progress=False, log_every=1)).fit()
    finally:
        watch.stop()
    losses = result.losses
    print(f"train losses {[round(v, 4) for v in losses]}")
    return len(losses) == 2 and all(v == v and abs(v) < 1e4 for v in losses), watch


def serve(model: str, checkpoint: Path) -> tuple[bool, float, int, torch.Tensor, torch.Tensor]:
    """Serve from the checkpoint, send one request; (ok, load seconds, gateway RSS, tokens, logits)."""
    from stagewise.comm import find_free_port

    port = find_free_port()
    cmd = [sys.executable, "-m", "stagewise.cli", "serve", model, "--checkpoint", str(checkpoint), "--stages", "4",
           "--port", str(port), "--max-batch-size", "1", "--replica-startup-timeout", "900",
           "--worker-timeout", "600", "--threads", "1", "--request-timeout", "600"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent / "src"))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 900:
                raise TimeoutError("server not ready in 900 s")
            time.sleep(0.5)
        load_s = time.monotonic() - t0
        gateway_rss = _status(proc.pid).get("VmRSS", 0)
        tokens = torch.randint(0, 100, (1, SEQ), generator=torch.Generator().manual_seed(1))
        body = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, SEQ],
                                       "data": tokens.reshape(-1).tolist()}]}).encode()
        req = urllib.request.Request(f"{url}/v2/models/big_llama/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())["outputs"]
        logits_out = next(o for o in out if o["name"].endswith("logits"))
        logits = torch.tensor(logits_out["data"]).reshape(logits_out["shape"])
        ok = list(logits.shape)[:2] == [1, SEQ] and bool(torch.isfinite(logits).all())
        return ok, load_s, gateway_rss, tokens, logits
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def reference_logits(model: str, checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The same weights run stage by stage in this process (each stage read from the checkpoint, then freed)."""
    from stagewise._spec import load_model_spec
    from stagewise.split import params_on_meta, split
    from stagewise.weights import open_weights

    with params_on_meta():
        spec = load_model_spec(model)
    spec.model.eval()
    sm = split(spec.model, (), {"input_ids": tokens}, stages=4)
    source = open_weights(checkpoint)
    inputs: dict[str, torch.Tensor] = {"input_ids": tokens}
    recv: list[Any] = []
    outputs: list[Any] = []
    with torch.inference_mode():
        for s in range(4):
            sm.materialise([s], read=lambda wanted, aliases: source.read(wanted, aliases=aliases))
            stage = sm.stages_for((), {"input_ids": tokens})[1][s]
            recv, outputs = stage(recv, inputs)
            sm.keep_only([])
    names = sm.stages[3].spec.outputs
    return outputs[next(i for i, n in enumerate(names) if n.endswith("logits"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    args = parser.parse_args()
    os.environ[_ENV] = json.dumps({"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab})
    model = f"{HERE}:big_llama"
    sizes = stage_bytes(model)
    params_gb = sum(sizes) / 1e9
    print(f"model {params_gb:.2f} GB float32; stages {[round(b / 1e9, 2) for b in sizes]} GB; "
          f"machine {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB")
    idle = idle_worker_rss()
    print(f"idle worker RSS {idle / 2**20:.0f} MiB")
    tmp = Path(tempfile.mkdtemp(prefix="stagewise-big-"))
    try:
        t0 = time.monotonic()
        train_ok, watch = train(model, tmp / "ckpt")
        # The ranks, in the order the forkserver forked them (rank 0 first: pids grow), each against its own stage.
        peaks = [watch.peak[pid] for pid in sorted(pid for pid in watch.peak if watch.depth.get(pid) == 2)]
        ratio = max(((peak - idle) / (2 * own) for peak, own in zip(peaks, sizes)), default=float("nan"))
        print(f"train {time.monotonic() - t0:.0f} s; rank peaks MiB {[p // 2**20 for p in peaks]}, their weights + "
              f"gradients MiB {[2 * b // 2**20 for b in sizes]}")
        serve_ok, load_s, gateway_rss, tokens, logits = serve(model, tmp / "ckpt")
        expected = reference_logits(model, tmp / "ckpt", tokens)
        same = torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
        print(f"served logits {list(logits.shape)} equal to the in-process stages: {same} "
              f"(max diff {float((logits - expected).abs().max()):.2e})")
        serve_ok = serve_ok and same
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"big_model params_gb={params_gb:.2f} stages=4 train_ok={int(train_ok)} serve_ok={int(serve_ok)} "
          f"peak_ratio={ratio:.2f} gateway_mb={gateway_rss / 2**20:.0f} load_s={load_s:.1f}")


if __name__ == "__main__":
    main()
