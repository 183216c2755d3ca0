"""New weights for a running pipeline backend: versions, the roll-out over its replicas, unload and load again.

A version is a checkpoint (by default labelled with its training step) that every stage worker reads its own FQNs
of, whatever layout saved it (``_weight_swap``). A roll-out:

1. sends ``load {id, version, checkpoint}`` to every stage of every ready replica; each loads in the background,
   into spare memory, while batches go on, and answers ``loaded`` or ``load_failed`` (why);
2. when every stage of every replica loaded it, switches the replicas one after another: ``switch {id}`` goes to
   stage 0 between two batches, and the stages after it switch with the first batch stamped with the new id. No
   replica stops, so capacity never drops; every answer is computed by one version, which it names;
3. if any stage fails to load (a missing, truncated or corrupt file: a Stagewise checkpoint is hashed as it is read;
   weights of another model), every replica drops what it loaded and goes on serving the old version; the load
   answers why, and the repository index shows the failed version as UNAVAILABLE with the reason.

A replica that restarts later starts on the version served now. Rollback is a load of an earlier version (its
checkpoint must still be on disk: a training run keeps its last ``--keep`` checkpoints). ``unload`` stops every
worker (requests get 503) until the next load starts them on the version it names.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._checkpoint_layout import MANIFEST, STEP_RE, latest_checkpoint, list_checkpoints, step_name
from ._protocol import BadRequestError, ServiceUnavailableError
from ._replicas import settle
from ._weight_swap import VERIFY

if TYPE_CHECKING:
    from ._replicas import PendingBatch, PipelineConfig, ReplicaState

__all__ = ["LiveUpdates", "Version", "checkpoint_step"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class Version:
    """One weights version a backend served or tried to."""

    id: int
    """Order of loading (0: the weights the service started with); a rollback gets a new id, an old label."""
    label: str
    """What answers report as ``model_version``."""
    checkpoint: str | None
    """The step directory it was read from; None: the weights the service started with (factory or --weights)."""
    state: str = "LOADING"
    """``LOADING``, ``READY`` (serving, or served before) or ``UNAVAILABLE`` (its load failed: ``reason``)."""
    reason: str = ""


@dataclasses.dataclass
class _Rollout:
    version: Version
    replicas: dict[int, int]
    """Replica index -> the generation loading it."""
    loaded: dict[int, set[int]]
    """Replica index -> its stages that loaded it."""
    failed: str | None = None


def checkpoint_step(path: str | Path) -> tuple[Path, int] | None:
    """The step directory ``path`` means (itself, or a root's ``latest``) and its step; None when it is neither."""
    path = Path(path)
    step_dir = path if (path / MANIFEST).is_file() else latest_checkpoint(path) if path.is_dir() else None
    match = STEP_RE.match(step_dir.name) if step_dir is not None else None
    return (step_dir, int(match.group(1))) if step_dir is not None and match else None


class LiveUpdates:
    """The versions half of :class:`~stagewise.serve.PipelineBackend` (which provides the attributes below)."""

    config: PipelineConfig
    name: str
    _lock: threading.RLock
    _cond: threading.Condition
    _replicas: list[ReplicaState]
    _closed: bool
    _waiting: collections.deque[PendingBatch]

    def _init_versions(self, repository: str | None) -> None:
        start = self.config.checkpoint
        found = checkpoint_step(start) if start else None  # a root's latest now: a restart reads this same step
        self._current = Version(id=0, label=str(found[1]) if found else "1",
                                checkpoint=str(found[0]) if found else None, state="READY")
        self._book: list[Version] = [self._current]
        self._rollout: _Rollout | None = None
        self._update_lock = threading.Lock()
        self._unloaded = False
        root = repository or (start and (str(Path(start).parent) if (Path(start) / MANIFEST).is_file() else start))
        self.repository = root or None
        """The checkpoint root whose steps ``load`` may name by version and the index lists."""

    # ------------------------------------------------------------------------------------------------ queries
    def current_version(self) -> Version:
        return self._current

    def served_versions(self) -> tuple[str, ...]:
        """Labels of the versions ready replicas run now, oldest load first (two while a roll-out switches)."""
        with self._lock:
            ids = sorted({(r.version_id, r.version) for r in self._replicas if r.state == "ready"})
        return tuple(dict.fromkeys(label for _, label in ids)) or (self._current.label,)

    def worker_source(self) -> dict[str, Any]:
        """What a worker starting now loads: the current version's checkpoint, id and label."""
        cur = self._current
        if cur.checkpoint is None:
            return {"version_id": cur.id, "version": cur.label}
        return {"checkpoint": cur.checkpoint, "weights": None, "version_id": cur.id, "version": cur.label}

    def repository_index(self) -> list[dict[str, str]]:
        """Every version loaded or tried, then the repository's checkpoints on disk not loaded (UNAVAILABLE)."""
        serving = set(self.served_versions()) if not self._unloaded else set()
        rows: dict[str, dict[str, str]] = {}
        for v in self._book:
            state = "READY" if v.label in serving else v.state if v.state != "READY" else "UNAVAILABLE"
            reason = v.reason or ("" if state == "READY" else "not served now; load it to serve it again")
            rows[v.label] = {"name": self.name, "version": v.label, "state": state, "reason": reason}
        for step, _ in list_checkpoints(Path(self.repository)) if self.repository else []:
            rows.setdefault(str(step), {"name": self.name, "version": str(step), "state": "UNAVAILABLE",
                                        "reason": "on disk, not loaded"})
        return list(rows.values())

    # ------------------------------------------------------------------------------------------------ load
    async def load_version(self, *, checkpoint: str | None = None, version: str | None = None,
                           verify: str = "sha256") -> str:
        return await asyncio.to_thread(self.load, checkpoint=checkpoint, version=version, verify=verify)

    def load(self, *, checkpoint: str | None = None, version: str | None = None, verify: str = "sha256") -> str:
        """Serve ``checkpoint`` (a step directory, or a root: its latest) as ``version`` (default: its step), or the
        known / on-disk ``version``, or (neither given) the repository's latest checkpoint. Blocks until every
        replica switched; raises :class:`BadRequestError` (the old version still serves) when it cannot.
        ``verify``: ``sha256`` hashes every checkpoint file as it is read; ``size`` checks sizes only (faster, for
        files that cannot have been damaged, e.g. pushed through shared memory a moment ago)."""
        if verify not in VERIFY:
            raise BadRequestError(f"verify must be one of {list(VERIFY)}, got {verify!r}")
        with self._update_lock:
            v = self._resolve(checkpoint, version)
            t0 = time.perf_counter()
            if self._unloaded:
                self._reload(v, verify)
            else:
                self._roll_out(v, verify)
            log.warning("model %s: now serving version %s from %s (%.2f s)", self.name, v.label, v.checkpoint,
                        time.perf_counter() - t0)
            return v.label

    def _resolve(self, checkpoint: str | None, version: str | None) -> Version:
        if checkpoint is None:
            known = [v for v in self._book if v.label == version and v.checkpoint is not None]
            if known:
                checkpoint = known[-1].checkpoint
            elif version is not None and version.isdigit() and self.repository:
                checkpoint = str(Path(self.repository) / step_name(int(version)))
            elif version is None and self.repository:
                checkpoint = self.repository
            else:
                raise BadRequestError(f"model {self.name!r}: no checkpoint for version {version!r}; name one "
                                      "with parameters.checkpoint (a step directory or a training run's root)")
        found = checkpoint_step(checkpoint)
        if found is None and not Path(checkpoint).exists():
            raise BadRequestError(f"model {self.name!r}: checkpoint {checkpoint} does not exist")
        path = str(found[0]) if found else str(checkpoint)  # a root: its latest step now, not whatever comes later
        label = version or (str(found[1]) if found else f"{max(v.id for v in self._book) + 1}")
        if not label or "/" in label:
            raise BadRequestError(f"version must be a non-empty string without '/', got {label!r}")
        clash = [v for v in self._book if v.label == label and v.checkpoint not in (None, path)
                 and v.state != "UNAVAILABLE"]
        if clash:
            raise BadRequestError(f"model {self.name!r}: version {label!r} was loaded from {clash[0].checkpoint}, "
                                  f"not {path}; give this checkpoint another version (parameters.version)")
        v = Version(id=max(x.id for x in self._book) + 1, label=label, checkpoint=path)
        self._book.append(v)
        return v

    def _roll_out(self, v: Version, verify: str) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        with self._cond:
            replicas = {r.index: r.generation for r in self._replicas if r.state == "ready"}
            if not replicas:
                self._refuse(v, "no replica is ready to load it")
            ro = self._rollout = _Rollout(v, replicas, {i: set() for i in replicas})
            for i in replicas:
                self._send_all(self._replicas[i], {"kind": "load", "id": v.id, "version": v.label,
                                                   "checkpoint": v.checkpoint, "verify": verify})
            stages = self.config.stages
            while ro.failed is None:
                for i, gen in list(ro.replicas.items()):  # a replica that failed meanwhile restarts on the current
                    rep = self._replicas[i]
                    if rep.generation != gen or rep.state != "ready":
                        del ro.replicas[i]
                if not ro.replicas:
                    ro.failed = "every replica failed while loading it"
                elif all(len(ro.loaded[i]) == stages for i in ro.replicas):
                    break
                elif time.monotonic() > deadline:
                    ro.failed = f"not loaded within {self.config.startup_timeout_s:g} s (--replica-startup-timeout)"
                else:
                    self._cond.wait(0.2)
            self._rollout = None
            if ro.failed is not None:
                for i in ro.replicas:
                    self._send_all(self._replicas[i], {"kind": "discard", "id": v.id})
                self._refuse(v, ro.failed)
            self._current, v.state = v, "READY"
            for i in ro.replicas:  # one replica after another, each between two of its batches
                rep = self._replicas[i]
                self._send(rep, 0, {"kind": "switch", "id": v.id})
                rep.version_id, rep.version = v.id, v.label
            for rep in self._replicas:  # became ready meanwhile, on the old version: restarts on this one
                if rep.state == "ready" and rep.version_id != v.id:
                    self._fail(rep, rep.generation, f"started on version {rep.version!r} while {v.label!r} was "
                                                    "loaded; it restarts on that")
            self._cond.notify_all()

    def _refuse(self, v: Version, why: str) -> None:
        v.state, v.reason = "UNAVAILABLE", why
        still = "nothing (unloaded)" if self._unloaded else f"version {self._current.label!r}"
        raise BadRequestError(f"model {self.name!r}: version {v.label!r} from {v.checkpoint} was not loaded: {why}; "
                              f"still serving {still}")

    def _send_all(self, rep: ReplicaState, header: dict[str, Any]) -> None:
        for s in list(rep.conns):
            self._send(rep, s, header)

    def _send(self, rep: ReplicaState, stage: int, header: dict[str, Any]) -> None:
        chan = rep.conns.get(stage)
        if chan is None:
            return
        try:
            chan.send(header)
        except OSError as exc:  # its reader thread fails the replica; a restart starts on the current version
            log.warning("replica %s stage %s: cannot send %s: %s", rep.index, stage, header["kind"], exc)

    def _on_load_reply(self, rep: ReplicaState, generation: int, stage: int, kind: str,
                       header: dict[str, Any]) -> None:
        """Under the backend's lock: a stage's ``loaded`` / ``load_failed``."""
        ro = self._rollout
        if ro is None or header.get("id") != ro.version.id or ro.replicas.get(rep.index) != generation:
            return
        if kind == "loaded":
            ro.loaded[rep.index].add(stage)
        elif ro.failed is None:
            ro.failed = f"stage {stage} of replica {rep.index}: {str(header.get('message', ''))[:2000]}"
        self._cond.notify_all()

    # ------------------------------------------------------------------------------------------------ unload
    async def unload(self) -> None:
        await asyncio.to_thread(self.unload_now)

    def unload_now(self) -> None:
        """Stop every worker; requests get 503 until the next load."""
        with self._update_lock, self._cond:
            self._unloaded = True
            for rep in self._replicas:
                self._stop_replica(rep)
            while self._waiting:
                settle(self._waiting.popleft(), error=ServiceUnavailableError(f"model {self.name!r} was unloaded"))
            self._cond.notify_all()

    def _stop_replica(self, rep: ReplicaState) -> None:
        rep.state = "stopped"
        self._drop_processes(rep, kill=True)
        for req in list(rep.inflight.values()):
            settle(req, error=ServiceUnavailableError(f"model {self.name!r} was unloaded"))
        rep.inflight.clear()

    def _reload(self, v: Version, verify: str) -> None:
        """Start every replica on ``v`` (after an unload); the checkpoint is verified here first."""
        if v.checkpoint is not None and checkpoint_step(v.checkpoint) is not None:
            from ..checkpoint import load_checkpoint

            try:
                load_checkpoint(v.checkpoint, verify="all" if verify == "sha256" else "size")
            except Exception as exc:  # noqa: BLE001 - any reason to refuse it is the answer
                self._refuse(v, f"{type(exc).__name__}: {exc}")
        with self._cond:
            self._current, v.state, self._unloaded = v, "READY", False
            for rep in self._replicas:
                rep.state, rep.restart_at, rep.failures = "failed", time.monotonic(), 0
            self._cond.notify_all()
        try:
            self.wait_ready(self.config.startup_timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            v.state, v.reason = "UNAVAILABLE", str(exc)
            raise ServiceUnavailableError(f"model {self.name!r}: version {v.label!r} did not start: {exc}") from None

    if TYPE_CHECKING:  # provided by PipelineBackend
        def _drop_processes(self, rep: ReplicaState, *, kill: bool) -> None: ...

        def _fail(self, rep: ReplicaState, generation: int, reason: str) -> None: ...

        def wait_ready(self, timeout_s: float = 120.0, *, replicas: int = 1) -> None: ...
