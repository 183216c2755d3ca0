"""The shared-memory transport: the ring itself in-process, then real processes: wrap-around, values larger than the
ring, many tags interleaved, deadlines, a peer SIGKILLed mid-message, and nothing left in /dev/shm."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stagewise import comm
from stagewise.comm import (
    BoundaryMismatchError,
    CommError,
    CommTimeoutError,
    ShmTransport,
    SpawnError,
    find_free_port,
    remove_shm_segments,
)
from stagewise.comm._shm_reader import BufferPool
from stagewise.comm._shm_ring import SHM_DIR, Ring, create_segment, unlink_segment
from stagewise.launch import forkserver_context, spawn

_DEADLINE = 60.0  # hang guard per spawned test
_RING = 64 * 1024  # the smallest ring: every test below wraps it many times
_PREFIX = "stagewise-shm-"


def _leftovers() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(_PREFIX)}


@pytest.fixture(autouse=True)
def _no_leaked_segments() -> Any:
    """Every test here leaves /dev/shm as it found it (whatever killed its processes)."""
    before = _leftovers()
    yield
    assert _leftovers() <= before, f"shared-memory segments left behind: {sorted(_leftovers() - before)}"


# --- The ring alone: one mapping, the producer and the consumer in this process.


def test_ring_wraps_around_and_never_overruns() -> None:
    name = f"{_PREFIX}test-{os.getpid()}"
    mm = create_segment(name, 1000)
    try:
        unlink_segment(name)
        producer, consumer = Ring(mm, name=name), Ring(mm, name=name)
        stream = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8)
        got = np.empty_like(stream)
        sent = taken = 0
        for step in range(200):
            sent += producer.write(stream, sent) if sent < len(stream) else 0
            assert producer.free() >= 0 and consumer.available() <= 1000  # never more in flight than the ring holds
            want = min(len(stream), taken + 1 + step * 37 % 700)  # uneven reads: every offset of the wrap is crossed
            taken += consumer.read_into(got[:want], taken)
        assert sent == taken == len(stream) and np.array_equal(got, stream)
        assert producer.write(stream[:1], 0) == 1 and consumer.contiguous(1) == 10_000 % 1000
    finally:
        mm.close()


# --- Real processes.


def _init(rank: int, world_size: int, port: int, **kw: Any) -> ShmTransport:
    torch.set_num_threads(1)
    return ShmTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=20.0, ring_bytes=_RING, **kw)


def _message(i: int) -> list[Any]:
    """Message ``i``: sizes from a few bytes to 16x the ring, every dtype in turn, scalars between (deterministic, so
    the receiver rebuilds what was sent)."""
    g = torch.Generator().manual_seed(i)
    dtypes = [getattr(torch, n) for n in comm.DTYPE_CODES if hasattr(torch, n)]
    dtype = dtypes[i % len(dtypes)]
    n = (1, 300, 5_000, 17_000, 200_000, 1_000_000)[i % 6] // dtype.itemsize or 1
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return [i, raw.view(dtype), float(i) / 3, None, torch.randn(3, 7, generator=g), i % 2 == 0]


def _assert_same(got: list[Any], want: list[Any], what: str) -> None:
    assert len(got) == len(want), what
    for a, b in zip(got, want):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, what
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), what
        else:
            assert type(a) is type(b) and a == b, what


def _stream_worker(rank: int, world_size: int, port: int) -> None:
    t = _init(rank, world_size, port)
    try:
        if rank == 0:  # 60 messages, 4 of them larger than the ring; the echo comes back the other way
            handles = [t.isend(_message(i), dst=1, tag=3) for i in range(60)]
            for h in handles:
                h.wait()
            for i in range(60):
                _assert_same(t.recv(src=1, tag=4), _message(i), f"echo {i}")
        else:
            for i in range(60):
                got = t.recv(src=0, tag=3)
                _assert_same(got, _message(i), f"message {i}")
                t.send(got, dst=0, tag=4)
        t.barrier()
    finally:
        t.close()


def test_shm_wraps_and_chunks_values_larger_than_the_ring() -> None:
    spawn(_stream_worker, 2, timeout=_DEADLINE, preload=("torch", "stagewise.comm"))


def _tags_worker(rank: int, world_size: int, port: int) -> None:
    t = _init(rank, world_size, port)
    tags = list(range(0, 4000, 97))
    try:
        if rank == 0:  # round-robin over tags, three messages each, some larger than the ring
            handles = [t.isend(_message(k * 100 + j), dst=1, tag=tag) for k in range(3) for j, tag in enumerate(tags)]
            got = t.recv(src=1, tag=1)  # rank 1 answers before it has read everything: sends progress meanwhile
            assert got == [len(tags)]
            for h in handles:
                h.wait()
            t.send([torch.ones(2, 3)], dst=1, tag=2)
        else:
            t.send([len(tags)], dst=0, tag=1)
            for tag in reversed(tags):  # the opposite order: every other tag is met on the way and kept
                j = tags.index(tag)
                for k in range(3):
                    _assert_same(t.recv(src=0, tag=tag), _message(k * 100 + j), f"tag {tag} message {k}")
            with pytest.raises(BoundaryMismatchError, match="expected shape .2, 4."):
                t.recv(src=0, tag=2, expect=[((2, 4), torch.float32)])
            t0 = time.monotonic()
            with pytest.raises(CommTimeoutError, match=r"rank 1: recv from rank 0 \(tag 9\) timed out after 0.5 s"):
                t.recv(src=0, tag=9, timeout=0.5)
            assert 0.45 < time.monotonic() - t0 < 3.0
        t.barrier()
        x = torch.full((5,), float(rank + 1))
        t.all_reduce(x, op="mean")  # collectives ride on the gloo group kept alongside
        assert torch.equal(x, torch.full((5,), 1.5))
        if rank == 0:  # a rank idle in recv for a second sleeps on its doorbell: it burns no core
            time.sleep(1.0)
            t.send([7], dst=1, tag=11)
        else:
            cpu0, wall0 = time.process_time(), time.monotonic()
            assert t.recv(src=0, tag=11) == [7]
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            assert wall > 0.8 and cpu < 0.15 * wall, f"{cpu:.3f} s of CPU while waiting {wall:.3f} s"
    finally:
        t.close()


def test_shm_many_tags_interleaved_keep_per_tag_order() -> None:
    spawn(_tags_worker, 2, timeout=_DEADLINE, preload=("torch", "stagewise.comm"))


def _victim_or_watcher(rank: int, port: int, out: str) -> None:
    t = _init(rank, 2, port, spin_us=50.0)
    if rank == 1:  # fills the ring with the start of a large message, then dies without a word
        t.isend([torch.zeros(1_000_000)], dst=0, tag=5)
        Path(out, "sent").write_text("1")
        os.kill(os.getpid(), signal.SIGKILL)
    while not Path(out, "sent").exists():
        time.sleep(0.01)
    t0 = time.monotonic()
    try:
        t.recv(src=1, tag=5, timeout=20.0)
    except CommError as exc:
        Path(out, "result").write_text(f"{time.monotonic() - t0:.3f} {type(exc).__name__}: {exc}")
    os._exit(0)  # the gloo group has a dead member: skip its teardown


def test_shm_peer_killed_mid_message_is_a_clear_error_at_once(tmp_path: Path) -> None:
    ctx = forkserver_context(("torch", "stagewise.comm"))
    port = find_free_port()
    procs = [ctx.Process(target=_victim_or_watcher, args=(rank, port, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(_DEADLINE)
        assert procs[1].exitcode == -signal.SIGKILL and procs[0].exitcode == 0
        waited, text = Path(tmp_path, "result").read_text().split(" ", 1)
        assert float(waited) < 5.0, text  # not the 20 s deadline: the pidfd says the peer is gone
        assert text.startswith("CommError: rank 0: recv from rank 1 (tag 5) failed: rank 1 (pid ")
        assert "exited" in text
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        remove_shm_segments(port)  # nothing expected: the fixture checks that the ranks left nothing


def _half_started_worker(rank: int, world_size: int, port: int) -> None:
    if rank == 0:
        _init(rank, world_size, port)
        return
    # Rank 1 joins the gloo group but never attaches: rank 0 has made its ring and waits, until spawn kills it.
    store = comm.rendezvous_store(host="127.0.0.1", port=port, rank=rank, world_size=world_size, timeout=20.0)
    comm.DistTransport.init(rank=rank, world_size=world_size, timeout=20.0, store=store)
    ring = Path(SHM_DIR, f"{_PREFIX}{port}-1-0")
    for _ in range(500):
        if ring.exists():
            raise RuntimeError("rank 1 gives up before attaching")
        time.sleep(0.01)
    raise AssertionError(f"rank 0 never made {ring}")


def test_launcher_removes_segments_of_a_run_killed_while_attaching() -> None:
    port = find_free_port()
    with pytest.raises(SpawnError, match="rank 1 gives up"):
        spawn(_half_started_worker, 2, port=port, timeout=_DEADLINE, preload=("torch", "stagewise.comm"))
    assert not any(n.startswith(f"{_PREFIX}{port}-") for n in os.listdir(SHM_DIR))


def test_shm_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="ring_bytes must be an int >= 65536"):
        ShmTransport.init(rank=0, world_size=1, master_port=find_free_port(), ring_bytes=1024)
    with pytest.raises(ValueError, match="spin_us must be >= 0"):
        ShmTransport.init(rank=0, world_size=1, master_port=find_free_port(), spin_us=-1.0)


def test_buffer_pool_reuses_only_buffers_nobody_holds() -> None:
    pool = BufferPool(keep=2)
    a = pool.tensor(1000)
    view = a.view(torch.float32)[10:]
    del a
    b = pool.tensor(1000)  # the first is still seen through ``view``: a new buffer
    assert b.data_ptr() != view.data_ptr() - 40
    first = view.data_ptr() - 40
    del view
    assert pool.tensor(1000).data_ptr() == first  # nothing holds it now: reused (warm pages)
    c = pool.tensor(1000)  # b is alive and the first is held by... nobody: reused again
    assert c.data_ptr() == first and c.data_ptr() != b.data_ptr()
    d = pool.tensor(5000)  # a size the pool lacks, and no free buffer to evict: not kept
    assert d.numel() == 5000 and len(pool._buffers) == 2
