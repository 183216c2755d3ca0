"""``stagewise serve`` (a split model behind the v2 HTTP gateway) and ``stagewise infer`` (a small v2 client).

The lead wires these into ``stagewise.cli``::

    add_serve_parser(sub); add_infer_parser(sub)     # each sets func=cmd_serve / cmd_infer
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._cli_config import add_config_arguments, config_values
from .._progress import Phases
from ._config import PipelineConfig

if TYPE_CHECKING:
    import numpy as np

__all__ = ["add_infer_parser", "add_serve_parser", "add_worker_parser", "cmd_infer", "cmd_serve", "cmd_worker"]

log = logging.getLogger(__name__)

_TOKEN_ENV = "STAGEWISE_TOKEN"
_NUMPY = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
          "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
          "FP32": "float32", "FP64": "float64"}
"""v2 datatype -> numpy dtype name (names: numpy is imported only by ``infer``, not by ``--help``)."""


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="serve a model split into pipeline stages over HTTP (KServe v2)",
        description="Split MODEL into --stages stage processes per replica, start --replicas replicas, and serve it "
                    "with dynamic batching on the Open Inference Protocol v2 (/v2/models/NAME/infer). A dead worker "
                    "costs a retry on another replica; its replica restarts in the background. New weights while it "
                    "serves: --watch a training run's checkpoints, or POST /v2/repository/models/NAME/load "
                    "{\"parameters\": {\"checkpoint\": DIR}}. Ctrl-C stops all.")
    add_config_arguments(p, PipelineConfig)  # MODEL and one flag per PipelineConfig setting, help from its fields
    p.add_argument("--trust-checkpoint-code", action="store_true",
                   help="when MODEL is a checkpoint directory, import the model factory its manifest names even if it "
                        "is not one of Stagewise's own (stagewise.*): that runs the checkpoint's chosen code")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="a plan from 'stagewise plan --mode serve --json' (sets stages, replicas and the cut)")
    p.add_argument("--tasks", default=None, metavar="FQN,...",
                   help="task split: serve the trunk plus each named head as its own model, NAME.HEAD "
                        "(the trunk takes --stages minus 1 stages)")
    p.add_argument("--submodels", default=None, metavar="FQN,...",
                   help="sub-model split: serve each named sub-module as its own model, NAME.FQN, on the inputs it "
                        "receives in the example call (each split into --stages stages)")
    p.add_argument("--watch", action="store_true",
                   help="follow the checkpoint directory (MODEL as CKPT_DIR, or --checkpoint DIR) of a training run: "
                        "serve each step it commits as a new model_version, switching without stopping (a step that "
                        "fails to load is skipped and the old version serves on)")
    p.add_argument("--watch-interval", type=float, default=2.0, metavar="S",
                   help="with --watch: seconds between looks at the checkpoint directory (default: 2)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000; 0 = any free port)")
    p.add_argument("--max-delay-ms", type=float, default=2.0,
                   help="longest a batch waits for more requests when traffic is dense (default: 2)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: ${_TOKEN_ENV}; none when unset)")
    p.add_argument("--max-payload-mb", type=float, default=64.0, help="largest request body in MiB (default: 64)")
    p.add_argument("--access-log", action="store_true",
                   help="log every HTTP request (off by default: /metrics counts requests, and a log line per request "
                        "costs the gateway CPU at high request rates)")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds to wait for the first ready replica (default: 300)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="an HTTP connection must send a complete request head within this many seconds, else it is "
                        "closed (slow or silent clients; default: 10)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="an idle keep-alive HTTP connection is closed after this many seconds (default: 5)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="HTTP connections served at once; a request on one more is answered 503 "
                        "(default: half the open-file limit, which serve raises to its hard limit, at most 10000)")
    p.set_defaults(func=cmd_serve)
    return p


def _stop_on_signals() -> list[int]:
    """SIGTERM (``timeout``, docker, systemd) and SIGINT both stop the server like Ctrl-C: raised as
    ``KeyboardInterrupt`` (uvicorn re-raises them after its graceful shutdown), so every worker is reaped on the way
    out. Returns the list that records which signal came."""
    got: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        got.append(signum)
        if len(got) == 1:  # a second signal must not interrupt the shutdown the first one started
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return got


def _check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` once, as uvicorn will (``SO_REUSEADDR``), and let go: a port another server holds fails
    here."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); another server may hold it: "
                          f"stop it or pick another --port (0 = any free port)") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from ._gateway import GatewayConfig, create_app
    from ._http_guard import HttpLimits, raise_nofile_limit
    from ._pipeline import PipelineBackend
    from ._server import run

    token = args.token or os.environ.get(_TOKEN_ENV) or None
    if args.max_payload_mb <= 0:
        raise ValueError(f"--max-payload-mb must be > 0, got {args.max_payload_mb}")
    limits = HttpLimits(header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive_timeout,
                        max_connections=args.max_connections)
    _check_port_free(args.host, args.port)  # a busy port is one line now, not after every worker started
    raise_nofile_limit()  # before any worker starts: they inherit it
    signals = _stop_on_signals()
    gateway_config = GatewayConfig(auth_token=token, max_payload_bytes=int(args.max_payload_mb * 2**20))
    model, checkpoint = args.model, args.checkpoint
    from ..weights import is_hf_folder

    if Path(model).is_dir() and not is_hf_folder(model):  # a checkpoint directory: its manifest names the model
        from ._serving_split import checkpoint_model

        model, checkpoint = checkpoint_model(model, trust_code=args.trust_checkpoint_code), model
        print(f"stagewise serve: model {model} (from the manifest of checkpoint {checkpoint})", file=sys.stderr,
              flush=True)
    settings = config_values(PipelineConfig, args) | {"join_token": token}
    cuts = None
    if args.plan:
        from ..plan import Plan

        plan = Plan.from_json(args.plan)
        settings.update(stages=plan.stages, replicas=plan.replicas)
        cuts = tuple(plan.cut[1:]) or None
    stages, replicas = settings["stages"], settings["replicas"]
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    subs = [t.strip() for t in args.submodels.split(",") if t.strip()] if args.submodels else []
    if tasks and subs:
        raise ValueError("give either --tasks or --submodels, not both")
    # One served model per task head or sub-model (each its own name), else the whole model.
    variants: list[dict[str, Any]] = ([{"tasks": tasks, "head": h} for h in tasks] if tasks else
                                      [{"submodule": m} for m in subs] or [{}])
    if args.watch and not checkpoint:
        raise ValueError("--watch follows a training run's checkpoint directory: give it as MODEL ('stagewise serve "
                         "CKPT_DIR --watch') or with --checkpoint DIR")
    backends: list[PipelineBackend] = []
    watcher = None
    try:
        with Phases("stagewise serve") as phase:  # a spinner on a terminal, erased once a replica is ready
            for v in variants:
                suffix = v.get("head") or v.get("submodule")
                name = (f"{args.name}.{suffix}" if suffix else args.name) if args.name else None
                chosen = {"model": model, "name": name, "checkpoint": checkpoint, "cuts": None if suffix else cuts}
                phase(f"capturing {model}{f' ({suffix})' if suffix else ''} and cutting it into {stages} stage(s)")
                backends.append(PipelineBackend(PipelineConfig(**settings | chosen | v)))
            names = ", ".join(repr(b.name) for b in backends)
            print(f"stagewise serve: starting {replicas} replica(s) x {stages} stage(s) of {names}",
                  file=sys.stderr, flush=True)
            phase(f"starting workers: {replicas} replica(s) x {stages} stage(s) of {names}")
            try:
                for backend in backends:
                    backend.wait_ready(args.startup_timeout)
            except (RuntimeError, TimeoutError) as exc:
                phase.close()
                print(f"stagewise serve: error: no replica became ready: {exc}", file=sys.stderr)
                return 1
        if args.watch:
            from ._watch import CheckpointWatcher

            assert backends[0].repository is not None
            watcher = CheckpointWatcher(backends, backends[0].repository, interval_s=args.watch_interval).start()
            print(f"stagewise serve: watching {backends[0].repository} for new checkpoints", file=sys.stderr,
                  flush=True)
        gateway_config.model_batching = {b.name: b.batching_config(max_delay_ms=args.max_delay_ms) for b in backends}
        app = create_app(backends, config=gateway_config)
        host = f"[{args.host}]" if ":" in args.host else args.host
        for backend in backends:
            print(f"stagewise serve: {backend.name!r} at http://{host}:{args.port}/v2/models/{backend.name}"
                  f"{' (bearer token required)' if token else ''}", file=sys.stderr, flush=True)
        print("stagewise serve: Ctrl-C stops", file=sys.stderr, flush=True)
        gc.freeze()  # startup's objects (torch, the model, the app) leave the collector: no ~0.1 s full collections
        run(app, host=args.host, port=args.port, access_log=args.access_log, limits=limits,
            log_level="debug" if log.getEffectiveLevel() <= logging.DEBUG else "info")
    except KeyboardInterrupt:
        pass
    finally:
        if watcher is not None:
            watcher.stop()
        for backend in backends:
            backend.shutdown()
    if signals:
        print(f"stagewise serve: stopped by {signal.Signals(signals[0]).name}; every worker reaped",
              file=sys.stderr, flush=True)
        return 128 + signals[0]
    return 0


def add_infer_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "infer", help="send one inference request to a v2 server and print the outputs",
        description="POST one request to URL/v2/models/MODEL_NAME/infer (JSON) and print every output. Inputs come "
                    "from --input NAME=FILE.npy or NAME=JSON-LIST (e.g. 'x=[[1,2,3]]'), or --random builds them from "
                    "the model's metadata.")
    p.add_argument("url", metavar="URL", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("model_name", metavar="MODEL_NAME", help="model name as served")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy|JSON",
                   help="one input (repeat for several)")
    p.add_argument("--random", action="store_true", help="random inputs built from the model metadata")
    p.add_argument("--rows", type=int, default=1, help="batch rows of --random inputs (default: 1)")
    p.add_argument("--int-high", type=int, default=2,
                   help="--random integers are drawn from [0, INT_HIGH) (default: 2; token ids, masks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default: 0)")
    p.add_argument("--token", default=None, help=f"bearer token (default: ${_TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in seconds (default: 60)")
    p.add_argument("--json", action="store_true", help="print the raw JSON response")
    p.set_defaults(func=cmd_infer)
    return p


def _parse_input(text: str, meta: dict[str, dict[str, Any]]) -> tuple[str, np.ndarray]:
    import numpy as np

    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--input must look like NAME=FILE.npy or NAME=JSON-LIST, got {text!r}")
    if name not in meta:
        raise ValueError(f"--input {name!r}: the model has inputs {sorted(meta)}")
    dtype = _NUMPY.get(meta[name]["datatype"])
    if dtype is None:
        raise ValueError(f"--input {name!r}: datatype {meta[name]['datatype']} is not supported by this client")
    if value.endswith(".npy"):
        if not Path(value).is_file():
            raise FileNotFoundError(f"--input {name!r}: file {value!r} does not exist")
        arr = np.load(value, allow_pickle=False)
    else:
        try:
            arr = np.asarray(json.loads(value))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--input {name!r}: {value!r} is neither a .npy file nor a JSON list ({exc})") from None
    return name, arr.astype(dtype)


def _random_input(spec: dict[str, Any], rows: int, int_high: int, rng: np.random.Generator) -> np.ndarray:
    shape = [rows if i == 0 else (1 if d < 0 else d) for i, d in enumerate(spec["shape"])]
    datatype = spec["datatype"]
    if datatype not in _NUMPY:
        raise ValueError(f"--random cannot build input {spec['name']!r} of datatype {datatype}")
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype("bool")
    if datatype.startswith(("INT", "UINT")):
        return rng.integers(0, int_high, size=shape).astype(_NUMPY[datatype])
    return rng.standard_normal(size=shape).astype(_NUMPY[datatype])


def cmd_infer(args: argparse.Namespace) -> int:
    import httpx
    import numpy as np

    token = args.token or os.environ.get(_TOKEN_ENV) or None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = f"{args.url.rstrip('/')}/v2/models/{args.model_name}"
    with httpx.Client(timeout=args.timeout, headers=headers) as client:
        try:
            resp = client.get(base)
        except httpx.TransportError as exc:
            raise ConnectionError(f"cannot reach {args.url} ({exc}); is 'stagewise serve' running there?") from None
        if resp.status_code != 200:
            raise ValueError(f"GET {base} answered {resp.status_code}: {resp.text[:500]}")
        meta = {t["name"]: t for t in resp.json()["inputs"]}
        if args.random == bool(args.input):
            raise ValueError(f"give either --random or --input NAME=... for each of {sorted(meta)}")
        if args.random:
            rng = np.random.default_rng(args.seed)
            inputs = {n: _random_input(t, args.rows, args.int_high, rng) for n, t in meta.items()}
        else:
            inputs = dict(_parse_input(text, meta) for text in args.input)
        body = {"inputs": [{"name": n, "datatype": meta[n]["datatype"], "shape": list(a.shape),
                            "data": a.reshape(-1).tolist()} for n, a in inputs.items()]}
        resp = client.post(f"{base}/infer", json=body)
    if resp.status_code != 200:
        raise ValueError(f"inference failed with HTTP {resp.status_code}: {resp.text[:1000]}")
    doc = resp.json()
    if args.json:
        print(json.dumps(doc))
        return 0
    for out in doc["outputs"]:
        dtype = _NUMPY.get(out["datatype"], object)
        arr = np.asarray(out["data"], dtype=dtype).reshape(out["shape"])
        print(f"{out['name']} {out['datatype']} {list(arr.shape)}")
        print(np.array2string(arr, threshold=64, edgeitems=3, precision=5))
    return 0


def add_worker_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "worker", help="run stage workers for a gateway on another host (stagewise serve --remote)",
        description="Join the gateway started with 'stagewise serve ... --remote REPLICA:STAGE --worker-listen "
                    "HOST:PORT --token T' and serve the position it assigns; when the worker ends (killed, or its "
                    "replica restarted) join again. MODEL's code must be importable here at the same path.")
    p.add_argument("--join", required=True, metavar="HOST:PORT", help="the gateway's --worker-listen address")
    p.add_argument("--token", default=None,
                   help=f"the gateway's token (default: ${_TOKEN_ENV}); proven by an HMAC challenge, never sent")
    p.add_argument("--join-timeout", type=float, default=60.0, metavar="S",
                   help="stop once the gateway, reached before, has been unreachable this many seconds in a row "
                        "(default: 60)")
    p.add_argument("--wait", type=float, default=300.0, metavar="S",
                   help="how long to wait for the gateway to come up at first (default: 300)")
    p.set_defaults(func=cmd_worker)
    return p


def cmd_worker(args: argparse.Namespace) -> int:
    host, _, port = args.join.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--join must be HOST:PORT, got {args.join!r}")
    token = args.token or os.environ.get(_TOKEN_ENV)
    if not token:
        raise ValueError(f"a worker proves it knows the gateway's token: give --token or set ${_TOKEN_ENV}")
    from ._join import run_worker_loop

    return run_worker_loop(host.strip("[]"), int(port), token, join_timeout_s=args.join_timeout, wait_s=args.wait)
