"""``stagewise serve-generate MODEL`` (serve a causal LM for text generation) and
``stagewise generate URL MODEL PROMPT`` (stream a completion to the terminal)."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from .._cli_config import add_config_arguments, config_values
from ._gen_config import GenerateConfig

__all__ = ["add_generate_parsers"]


def add_generate_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-generate", help="serve a causal language model for text generation (OpenAI and KServe "
                                              "generate APIs) split into pipeline stages")
    add_config_arguments(p, GenerateConfig)  # MODEL and one flag per GenerateConfig setting, help from its fields
    p.add_argument("--host", dest="http_host", default="127.0.0.1", help="HTTP address (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every route but health")
    p.set_defaults(func=_cmd_serve_generate)
    g = sub.add_parser("generate", help="stream a completion from a generation server to the terminal")
    g.add_argument("url", metavar="URL", help="server address, e.g. http://127.0.0.1:8000")
    g.add_argument("model", metavar="MODEL", help="model name (GET URL/v1/models lists them)")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible output)")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message (the chat template applies)")
    g.set_defaults(func=_cmd_generate)


def _cmd_serve_generate(args: argparse.Namespace) -> int:
    from ._gen_backend import GenerateBackend
    from ._gen_routes import create_generate_app
    from ._server import run

    backend = GenerateBackend(GenerateConfig(**config_values(GenerateConfig, args)))
    try:
        backend.wait_ready()
        print(f"serving {backend.name!r} for generation at http://{args.http_host}:{args.port}/v1", file=sys.stderr)
        run(create_generate_app(backend, auth_token=args.token), host=args.http_host, port=args.port)
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
