"""Serve a trained digits MLP as a 2-stage pipeline and classify held-out digits over HTTP (KServe v2 protocol).

    stagewise train stagewise.zoo.basic:mlp --stages 2 --steps 150 --global-batch 64 --lr 2e-3 --save runs/quickstart
    python examples/serve_digits.py runs/quickstart
"""

from __future__ import annotations

import sys

import httpx
import torch

from stagewise.serve import GatewayConfig, PipelineBackend, create_app, serve_app
from stagewise.zoo.basic import load_digits_tensors


def main(checkpoint: str, *, n: int = 64) -> float:
    backend = PipelineBackend("stagewise.zoo.basic:mlp", stages=2, replicas=1, max_batch_size=16,
                              checkpoint=checkpoint)
    try:
        backend.wait_ready(300)
        app = create_app(backend, config=GatewayConfig(batching=backend.batching_config()))
        with serve_app(app, port=0) as server:
            x, y = load_digits_tensors()
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
            held = order[len(x) * 4 // 5:][:n]  # the zoo's held-out fifth
            meta = httpx.get(f"{server.url}/v2/models/mlp", timeout=30).json()
            name = meta["inputs"][0]["name"]
            correct = 0
            with httpx.Client(timeout=60) as client:
                for i in held.tolist():
                    body = {"inputs": [{"name": name, "shape": [1, 64], "datatype": "FP32",
                                        "data": x[i].tolist()}]}
                    out = client.post(f"{server.url}/v2/models/mlp/infer", json=body).json()["outputs"][0]
                    correct += int(torch.tensor(out["data"]).argmax()) == int(y[i])
            accuracy = correct / len(held)
            print(f"served {len(held)} held-out digits through {server.url}: accuracy {accuracy:.3f}")
            return accuracy
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
