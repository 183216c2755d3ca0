"""Benchmark generation: a 2-stage pipeline with continuous batching against Hugging Face ``generate`` in one process.

Run: ``PYTHONPATH=src python bench/generate.py``. The model is a random Llama (hidden 512, 8 layers, vocab 8192; big
enough that the matrix products, not Python, take most of a step on a CPU), saved as a folder and served by a real
:class:`GenerateBackend` (2 stage-worker processes, one torch thread each). 16 requests of mixed prompt lengths
(16..128 tokens) arrive at once, each asks for ``--new`` tokens (end-of-sequence ignored so every run makes the same
number of tokens), through the backend's async API (no HTTP: the engine is measured, not the web server).

References, in this process with ``--hf-threads`` torch threads (default 1: the pipeline's workers run one thread
each; on a small shared machine a 2-thread ``generate`` measured 10x slower than a 1-thread one while other processes
ran, so 1 is the reference that is not handicapped, though the 2-stage pipeline then uses 2 cores where it uses 1):

- sequential: ``model.generate`` per request, one after another;
- batched: one ``model.generate`` call for all 16, left-padded.

Reported: generated tokens/s of the pipeline over each reference, time to first token (p50 over the requests, from
submission) and inter-token latency (p50 over every gap between two tokens of a request). The last line is
machine-readable: ``generate vs_hf_sequential=S vs_hf_batched=B ttft_p50_ms=T itl_p50_ms=I``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import torch
import transformers

from stagewise.serve import GenerateBackend, GenerateConfig
from stagewise.serve._gen_sampling import SamplingParams


def _model(folder: str, *, hidden: int, layers: int, vocab: int) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=8, intermediate_size=hidden * 11 // 4, vocab_size=vocab,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 129, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def _hf_sequential(model: transformers.PreTrainedModel, prompts: list[list[int]], new: int) -> float:
    t0 = time.perf_counter()
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new)
        assert out.shape[1] == len(p) + new
    return len(prompts) * new / (time.perf_counter() - t0)


def _hf_batched(model: transformers.PreTrainedModel, prompts: list[list[int]], new: int) -> float:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new)
    assert out.shape[1] == longest + new
    return len(prompts) * new / (time.perf_counter() - t0)


async def _pipeline(backend: GenerateBackend, prompts: list[list[int]], new: int
                    ) -> tuple[float, list[float], list[float]]:
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)

    async def one(p: list[int]) -> list[float]:
        start, times = time.perf_counter(), []
        async for _ in backend.generate(p, params):
            times.append(time.perf_counter() - start)
        return times

    t0 = time.perf_counter()
    stamps = await asyncio.gather(*(one(p) for p in prompts))
    rate = sum(len(s) for s in stamps) / (time.perf_counter() - t0)
    ttft = [s[0] for s in stamps]
    itl = [b - a for s in stamps for a, b in zip(s, s[1:])]
    return rate, ttft, itl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--hf-threads", type=int, default=1, help="torch threads of the Hugging Face references")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = _model(folder, hidden=args.hidden, layers=args.layers, vocab=args.vocab)
        prompts = _prompts(args.requests, args.vocab)
        backend = GenerateBackend(GenerateConfig(model=folder, stages=args.stages, max_seqs=args.requests,
                                                 max_len=512, threads_per_worker=1))
        try:
            backend.wait_ready()
            asyncio.run(_pipeline(backend, prompts[:2], 4))  # warm-up
            rate, ttft, itl = asyncio.run(_pipeline(backend, prompts, args.new))
        finally:
            backend.close()
        torch.set_num_threads(args.hf_threads)
        with torch.inference_mode():
            model.generate(torch.tensor([prompts[0]]), max_new_tokens=2)  # warm-up
            sequential = _hf_sequential(model, prompts, args.new)
            batched = _hf_batched(model, prompts, args.new)
    ttft_ms, itl_ms = 1000 * statistics.median(ttft), 1000 * statistics.median(itl)
    print(f"pipeline {rate:.1f} tok/s, HF sequential {sequential:.1f} tok/s, HF batched {batched:.1f} tok/s "
          f"({args.requests} requests x {args.new} tokens, {args.stages} stages)")
    print(f"generate vs_hf_sequential={rate / sequential:.2f} vs_hf_batched={rate / batched:.2f} "
          f"ttft_p50_ms={ttft_ms:.1f} itl_p50_ms={itl_ms:.1f}")


if __name__ == "__main__":
    main()
