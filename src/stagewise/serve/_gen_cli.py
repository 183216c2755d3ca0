"""``stagewise serve-generate MODEL`` (serve a causal LM for text generation) and
``stagewise generate URL MODEL PROMPT`` (stream a completion to the terminal)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

__all__ = ["add_generate_parsers"]


def add_generate_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-generate", help="serve a causal language model for text generation (OpenAI and KServe "
                                              "generate APIs) split into pipeline stages")
    p.add_argument("model", metavar="MODEL", help="Hugging Face model folder (with tokenizer.json) or "
                                                  "'package.module:factory'")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (worker processes)")
    p.add_argument("--name", default=None, help="model name in the APIs (default: the folder's name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, or a folder holding one")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences generated at once (KV slots per stage)")
    p.add_argument("--kv-budget-mb", type=float, default=None,
                   help="KV-cache memory per stage (MiB); sets the number of sequences instead of --max-seqs")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence a slot holds")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cmd_serve_generate)
    g = sub.add_parser("generate", help="stream a completion from a generation server to the terminal")
    g.add_argument("url", metavar="URL", help="server address, e.g. http://127.0.0.1:8000")
    g.add_argument("model", metavar="MODEL", help="model name (GET URL/v1/models lists them)")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message (the chat template applies)")
    g.set_defaults(func=_cmd_generate)


def _cmd_serve_generate(args: argparse.Namespace) -> int:
    from ._gen_backend import GenerateBackend
    from ._gen_config import GenerateConfig
    from ._gen_routes import create_generate_app
    from ._server import run

    backend = GenerateBackend(GenerateConfig(model=args.model, stages=args.stages, name=args.name,
                                             tokenizer=args.tokenizer, max_seqs=args.max_seqs, max_len=args.max_len,
                                             kv_budget_mb=args.kv_budget_mb,
                                             max_queue=args.max_queue, dtype=args.dtype))
    try:
        backend.wait_ready()
        print(f"serving {backend.name!r} for generation at http://{args.host}:{args.port}/v1", file=sys.stderr)
        run(create_generate_app(backend), host=args.host, port=args.port)
    finally:
        backend.close()
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                               "top_p": args.top_p, "stream": True}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": args.prompt}]
    else:
        path, body["prompt"] = "/v1/completions", args.prompt
    request = urllib.request.Request(args.url.rstrip("/") + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text = choice["delta"].get("content", "") if args.chat else choice["text"]
                sys.stdout.write(text)
                sys.stdout.flush()
    except urllib.error.HTTPError as exc:
        print(f"error {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0
