"""``stagewise train ... --serve-url URL --push-every N``: a training run hands its weights to a running service.

Every N steps (and after the last one) the run writes its weights, without optimizer state, as a checkpoint (the
same writer as ``--save``: per-rank parts by FQN, sha256 per file, committed atomically) into ``--push-dir``, by
default a folder in ``/dev/shm``: memory shared by every process of the host, so when training and serving share a
host the weights never touch a disk. Rank 0 then asks the service to load that step
(``POST URL/v2/repository/models/NAME/load``); each serving stage reads its own FQNs from shared memory, whatever the
training layout. The request runs in a thread: the step loop goes on while the service loads and switches; the next
push first waits for it, so the service loads the pushes in order. A refused or failed push is logged and the run
goes on (the service keeps serving what it had). The last 3 pushes stay in the folder (a restarting serving replica
reads the version it serves from there): it is left in place at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .._checkpoint_layout import step_name
from ..checkpoint import CheckpointWriter
from ._rank import RankState, stage_tensors

__all__ = ["WeightPusher", "default_push_dir", "load_url"]

_TOKEN_ENV = "STAGEWISE_TOKEN"
KEEP = 3


def load_url(serve_url: str, default_name: str) -> str:
    """The service's load route: ``serve_url`` is the server (the model is ``default_name``) or the model's URL
    (``http://HOST:PORT/v2/models/NAME``)."""
    base, sep, name = serve_url.rstrip("/").partition("/v2/models/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--serve-url must be http(s)://HOST:PORT[/v2/models/NAME], got {serve_url!r}")
    return f"{base}/v2/repository/models/{name.split('/')[0] if sep else default_name}/load"


def default_push_dir(run: str) -> Path:
    """A folder in shared memory (``/dev/shm``) when the host has one, else in the temp folder."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return parent / f"stagewise-push-{run}"


class WeightPusher:
    """One per rank: :meth:`push` at a step writes this rank's part; rank 0 commits and sends the load request."""

    def __init__(self, rs: RankState, *, folder: Path) -> None:
        output = rs.config.output
        assert output.serve_url is not None
        self.rs, self.folder = rs, folder
        self.url = load_url(output.serve_url, rs.spec.name)
        self.writer = CheckpointWriter(folder, keep=KEEP, clean=rs.rank == 0)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="push") if rs.rank == 0 else None
        self._pending: concurrent.futures.Future[None] | None = None
        self.results: list[str] = []
        """Rank 0: one line per push, what the service answered."""

    def due(self, step: int) -> bool:
        every = self.rs.config.output.push_every
        return step == self.rs.config.steps or bool(every and step % every == 0)

    def push(self, step: int) -> None:
        rs, timeout = self.rs, self.rs.config.runtime.timeout
        tensors = stage_tensors(rs.stages) if rs.replica == 0 else {}
        self.writer.save_part(step, part=f"rank{rs.rank}", tensors={k: v.cpu() for k, v in tensors.items()})
        rs.transport.barrier(timeout=timeout)
        if rs.rank != 0:
            return
        self.drain()  # the service loads pushes in order, and never one the writer is about to prune
        self.writer.commit(step, parts=[f"rank{r}" for r in range(rs.transport.world_size)], partition=rs.partition,
                           manifest_extra={"step": step, "pushed_to": self.url})
        assert self._pool is not None
        self._pending = self._pool.submit(self._post, step, str(self.folder / step_name(step)))

    def _post(self, step: int, step_dir: str) -> None:
        body = json.dumps({"parameters": {"checkpoint": step_dir, "version": str(step)}}).encode()
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(_TOKEN_ENV)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=max(120.0, self.rs.config.runtime.timeout)) as resp:
                line = f"step {step}: served as version {json.loads(resp.read()).get('version')}"
        except urllib.error.HTTPError as exc:
            line = f"step {step}: refused ({exc.code}): {exc.read().decode(errors='replace')[:500]}"
        except (urllib.error.URLError, OSError) as exc:
            line = f"step {step}: not pushed: {self.url} unreachable ({exc})"
        self.results.append(line)
        print(f"push {line}", flush=True)

    def drain(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown()
            if self.results:
                print(f"pushed weights stay in {self.folder} (the service reads its version there when a replica "
                      "restarts): remove it once the service no longer needs it", flush=True)
