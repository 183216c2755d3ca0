"""A steady inference load for serving tests, and the kill-a-worker-under-load check they share.

:class:`Load` runs client threads that post (2, 10) requests to ``large_model`` until stopped and compare every answer
with the model computed in this process; :func:`kill_under_load` kills a worker of replica 0 while it runs and waits
for the replica to go down, for answers to go on meanwhile, and for the replica to come back and serve.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import torch

from stagewise._spec import load_model_spec

MODEL = "stagewise.zoo.basic:large_model"


def wait_until(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class Load:
    """``clients`` threads posting to ``url`` (a gateway serving ``large_model``) until the ``with`` block ends."""

    def __init__(self, url: str, *, clients: int = 3) -> None:
        self.url = f"{url}/v2/models/large_model/infer"
        self.model = load_model_spec(MODEL).model.eval()
        self.answers: list[bool] = []
        """One entry per answered request: whether it equals the model's output."""
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        rng = np.random.default_rng(100 + i)
        with httpx.Client(timeout=120) as c:
            while not self._stop.is_set():
                x = rng.standard_normal((2, 10)).astype(np.float32)
                body = {"inputs": [{"name": "arg0", "datatype": "FP32", "shape": [2, 10],
                                    "data": x.reshape(-1).tolist()}]}
                resp = c.post(self.url, json=body)
                if resp.status_code != 200:
                    self.errors.append(resp.text)
                    continue
                out = resp.json()["outputs"][0]
                got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
                with torch.no_grad():
                    want = self.model(torch.from_numpy(x)).numpy()
                self.answers.append(bool(np.allclose(got, want, atol=1e-5, rtol=0)))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def check(self) -> None:
        """No client hung, no request failed, every answer right (and there were some)."""
        assert not any(t.is_alive() for t in self._threads), "a client hung"
        assert not self.errors, self.errors[:3]
        assert self.answers and all(self.answers), f"{self.answers.count(False)} wrong of {len(self.answers)}"


def kill_under_load(backend: Any, load: Load, kill: Callable[[], None], *, back_s: float = 60.0) -> str:
    """With ``load`` running: ``kill()`` a worker of replica 0, then wait for the replica to be taken down, for 20 more
    answers while it restarts, and for it to come back (within ``back_s``) and serve. Returns why it went down."""
    generation = backend.status()[0].generation
    kill()
    wait_until(lambda: backend.status()[0].generation > generation, 30, "replica 0 to be taken down")
    cause = backend.status()[0].last_error or ""
    before = len(load.answers)
    wait_until(lambda: len(load.answers) >= before + 20, 60, "answers while replica 0 restarts")
    wait_until(lambda: backend.status()[0].state == "ready", back_s, "replica 0 to come back")
    done = backend.status()[0].completed
    wait_until(lambda: backend.status()[0].completed >= done + 3, 60, "the restarted replica to serve")
    return cause
