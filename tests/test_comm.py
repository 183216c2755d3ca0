"""The transport seam: framing round-trips, timeouts, boundary checks and collectives, in-process and on gloo."""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from stagewise import comm
from stagewise.comm import (
    BoundaryMismatchError,
    CommTimeoutError,
    DistTransport,
    FramingError,
    LocalHub,
    LocalTransport,
    SpawnError,
    TransportClosedError,
)
from stagewise.comm._framing import (
    HEADER_STRUCT,
    PACK_LIMIT,
    TensorDesc,
    buffer_layout,
    encode,
    materialise,
    materialise_from,
    parse_descriptors,
    parse_header,
    prepare,
)
from stagewise.launch import spawn

# --- Cases: deterministic, so a spawned rank can rebuild exactly what its peer sent.


def _random_of(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Arbitrary bytes viewed as ``dtype`` (works for float8/float4 too, which have no RNG kernels)."""
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _cases() -> dict[str, list[Any]]:
    g = torch.Generator().manual_seed(0)
    dtypes = [getattr(torch, n) for n in comm.DTYPE_CODES if hasattr(torch, n)]
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    cases: dict[str, list[Any]] = {
        "all_dtypes": [_random_of(dt, (2, 3), g) for dt in dtypes],
        "shapes": [_random_of(torch.float32, s, g) for s in [(), (1,), (7,), (2, 3, 4), (1, 1, 1, 1, 2)]],
        "empty": [torch.zeros(0), torch.zeros(2, 0, 3, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)],
        "non_contiguous": [
            torch.arange(12).reshape(3, 4).t(),                              # transposed
            mask[:, None, None, :].expand(2, 4, 5, 5),                        # stride-0 attention mask
            torch.arange(20.0)[::3],                                         # strided slice
            torch.randn(3, 4, generator=g).to(torch.complex64).conj(),       # lazy conjugate bit
        ],
        "scalars": [0, -(2**63), 2**63 - 1, 1.5, float("-inf"), -0.0, True, False, None],
        "mixed": [torch.randn(2, 3, generator=g, requires_grad=True), 4, None, torch.ones(3, dtype=torch.int32),
                  torch.randn(PACK_LIMIT // 4 + 10, generator=g), torch.tensor(7), 0.25],
        "header_overflow": [torch.zeros(1, 2, 1, 2, 1, dtype=torch.float16) + i for i in range(12)],
        "pack_fills_first_message": [torch.randn(PACK_LIMIT // 4, generator=g), 3],  # inline area exactly full
        "pack_spills": [_random_of(torch.bfloat16, (40, 512), g), torch.randn(40, 256, generator=g),  # 80 KiB pack
                        torch.randn(PACK_LIMIT // 8 + 1, dtype=torch.float64, generator=g)],
        "nothing": [],
    }
    return cases


def _same(a: Any, b: Any) -> bool:
    """Equal type and value; tensors must match shape, dtype, requires_grad and bytes, and be contiguous."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        a_bytes = a.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8)
        return (b.is_contiguous() and b.requires_grad == a.requires_grad
                and torch.equal(a_bytes, b.detach().reshape(-1).view(torch.uint8)))
    return type(a) is type(b) and (a == b or a != a and b != b) and str(a) == str(b)  # -0.0 vs 0.0 via str


def _assert_same(sent: list[Any], got: list[Any], case: str) -> None:
    assert len(sent) == len(got), case
    for i, (a, b) in enumerate(zip(sent, got)):
        assert _same(a, b), f"{case}[{i}]: sent {a!r}, got {b!r}"


def _pair() -> tuple[LocalTransport, LocalTransport]:
    hub = LocalHub(2, timeout=5.0)
    return hub.transport(0), hub.transport(1)


def _threads(fns: list[Callable[[], None]], timeout: float = 10.0) -> None:
    """Run each fn on its own thread; re-raise the first error; fail if any is still running at the deadline."""
    errors: list[BaseException] = []
    ts = [threading.Thread(target=lambda f=fn: _catch(f, errors), daemon=True) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a rank thread is still running (hang)"
    if errors:
        raise errors[0]


def _catch(fn: Callable[[], None], errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


# --- Framing and LocalTransport


def test_public_surface() -> None:  # the names themselves are pinned in tests/test_api.py
    assert {"DistTransport", "ShmTransport", "LocalTransport", "Transport"} <= set(comm.__all__)
    assert issubclass(CommTimeoutError, TimeoutError) and issubclass(BoundaryMismatchError, ValueError)


def test_dtype_table_covers_every_numeric_torch_dtype() -> None:
    assert len(set(comm.DTYPE_CODES.values())) == len(comm.DTYPE_CODES)  # codes are unique
    non_numeric = re.compile(r"bits.*|u?int[1-7]|q.*|bit")  # sub-byte shells, raw bits, quantized
    dtypes = {n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype) and not non_numeric.fullmatch(n)}
    canonical = {str(getattr(torch, n)).removeprefix("torch.") for n in dtypes}  # float, not its alias "float32"
    assert canonical <= set(comm.DTYPE_CODES), canonical - set(comm.DTYPE_CODES)


@pytest.mark.parametrize("case", sorted(_cases()))
def test_local_roundtrip(case: str) -> None:
    sent = _cases()[case]
    a, b = _pair()
    handle = a.isend(sent, dst=1, tag=3)
    got = b.recv(src=0, tag=3, timeout=5.0)
    handle.wait(1.0)
    _assert_same(sent, got, case)


def test_frame_layout_matches_header() -> None:
    for name, values in _cases().items():  # what encode() sends is what the receiver allocates from the header
        frame = encode(values, src=0, tag=1)
        n, ext_len = parse_header(frame.header, src=0, tag=1)
        descs = parse_descriptors(frame.header, frame.extension)
        assert n == len(values) == len(descs), name
        assert ext_len == (0 if frame.extension is None else frame.extension.numel()), name
        assert [p.numel() for p in frame.payloads] == buffer_layout(descs)[0], name
    frame = encode(_cases()["header_overflow"], src=0, tag=1)
    assert frame.extension is not None and len(frame.payloads) == 1  # 12 small tensors share one pack
    frame = encode(_cases()["mixed"], src=0, tag=1)
    assert [p.numel() > PACK_LIMIT for p in frame.payloads] == [False, True]


def test_materialise_from_reads_a_pack_inside_a_larger_message() -> None:
    # A transport's first message carries the pack after the header: a view into it must read as the pack on its own.
    for name, values in _cases().items():
        frame = encode(values, src=0, tag=1)
        descs = parse_descriptors(frame.header, frame.extension)
        _, where, pack_bytes = buffer_layout(descs)
        if not pack_bytes:
            continue
        message = torch.full((48 + pack_bytes + 16,), 0xAB, dtype=torch.uint8)  # header room, pack, unread tail
        message[48:48 + pack_bytes].copy_(frame.payloads[0])
        got = materialise_from(descs, where, pack=message[48:48 + pack_bytes], large=frame.payloads[1:],
                               device=torch.device("cpu"))
        _assert_same(values, got, name)
        _assert_same(materialise(descs, frame.payloads, torch.device("cpu")), got, name)
        message.fill_(0)  # small values own their storage: the message buffer may take the next one
        _assert_same(values, got, name)


def test_header_bytes_pin_the_wire_format() -> None:
    values = [0, 1, 0.001, torch.ones(1, 256, requires_grad=True), None, True]
    frame = encode(values, src=2, tag=7)
    bits = struct.unpack("=q", struct.pack("=d", 0.001))[0]
    desc = [2, 0, 2, 1, 3, bits, 1, 12, 1, 2, 1, 256, 5, 4, 1]  # INT, INT, FLOAT, TENSOR f32 grad (1, 256), NONE, BOOL
    assert frame.header.tolist() == [0x53544757, 1, 2, 7, 6, len(desc), *desc] + [0] * (64 - 6 - len(desc))
    assert frame.extension is None and [p.numel() for p in frame.payloads] == [1024]
    raw = bytearray(HEADER_STRUCT.size)  # the transports' path: one pack_into, one unpack_from
    prepare(values).write_header(raw, src=2, tag=7)
    assert bytes(raw) == frame.header.numpy().tobytes()
    slots = HEADER_STRUCT.unpack(raw)
    assert parse_header(slots, src=2, tag=7) == (6, 0)
    assert parse_descriptors(slots, None) == [0, 1, 0.001, TensorDesc(torch.float32, (1, 256), True), None, True]


def test_frame_checks_magic_sender_and_tag() -> None:
    frame = encode([torch.ones(2)], src=0, tag=4)
    with pytest.raises(FramingError, match="tag 5 but received one sent by rank 0 with tag 4"):
        parse_header(frame.header, src=0, tag=5)
    with pytest.raises(FramingError, match="not a Stagewise frame"):
        parse_header(torch.zeros_like(frame.header), src=0, tag=4)


def test_local_values_do_not_alias() -> None:
    a, b = _pair()
    x, big = torch.zeros(3), torch.zeros(PACK_LIMIT)  # one packed, one sent on its own
    handle = a.isend([x, big], dst=1)
    x += 1  # after isend: the message is a snapshot
    big += 1
    got_x, got_big = b.recv(src=0)
    handle.wait(1.0)
    assert got_x.sum() == 0 and got_big.sum() == 0
    got_x += 5
    assert x.sum() == 3


def test_local_tags_are_independent_channels_in_order() -> None:
    a, b = _pair()
    handles = [a.isend([i], dst=1, tag=1) for i in range(3)] + [a.isend([False], dst=1, tag=2)]
    assert b.recv(src=0, tag=2) == [False]
    assert [b.recv(src=0, tag=1)[0] for _ in range(3)] == [0, 1, 2]
    for h in handles:
        h.wait(1.0)


def test_local_recv_and_send_time_out_quickly() -> None:
    a, b = _pair()
    t0 = time.monotonic()
    with pytest.raises(CommTimeoutError, match=r"rank 1: recv from rank 0 \(tag 5\) timed out after 0.3 s") as ei:
        b.recv(src=0, tag=5, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert (ei.value.rank, ei.value.peer, ei.value.tag) == (1, 0, 5)
    with pytest.raises(CommTimeoutError, match=r"send to rank 1 \(tag 2\)"):  # send is a rendezvous, like gloo
        a.send([torch.ones(1)], dst=1, tag=2, timeout=0.3)


def test_expect_mismatch_names_index_and_specs() -> None:
    a, b = _pair()

    def exchange(values: list[Any], expect: list[Any]) -> list[Any]:
        handle = a.isend(values, dst=1)
        try:
            return b.recv(src=0, expect=expect)
        finally:
            handle.wait(1.0)

    x, ids = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(BoundaryMismatchError) as ei:
        exchange([ids, x], [((2, 4), torch.int64), ((2, 3), torch.float32)])
    msg = str(ei.value)
    assert "value 1" in msg and "expected shape (2, 3) dtype torch.float32" in msg
    assert "received shape (2, 4) dtype torch.float32" in msg and "from rank 0 (tag 0)" in msg
    assert ei.value.index == 1
    with pytest.raises(BoundaryMismatchError, match="value 0 .* expected shape \\(2, 4\\) dtype torch.float32, rec"):
        exchange([ids], [((2, 4), torch.float32)])
    with pytest.raises(BoundaryMismatchError, match="expected 1 values, received 2"):
        exchange([x, 3], [((2, 4), torch.float32)])
    with pytest.raises(BoundaryMismatchError, match="value 0 .* expected int, received bool True"):
        exchange([True], [int])

    class Spec:  # like split.ValueSpec: dtype given by name
        shape, dtype = [2, 4], "float32"

    assert exchange([x, 3, None], [Spec(), int, None])[1:] == [3, None]
    assert exchange([x], [((-1, 4), "torch.float32")])[0].shape == (2, 4)  # -1: any batch size


def test_bad_arguments_are_value_errors() -> None:
    hub = LocalHub(2, timeout=1.0)
    a = hub.transport(0)
    with pytest.raises(ValueError, match="dst=0 is this rank itself"):
        a.isend([1], dst=0)
    with pytest.raises(ValueError, match="tag must be"):
        a.isend([1], dst=1, tag=-1)
    with pytest.raises(ValueError, match="does not fit in int64"):
        a.isend([2**70], dst=1)
    with pytest.raises(TypeError, match="cannot send str"):
        a.isend(["text"], dst=1)
    with pytest.raises(ValueError, match="op='mean' needs a floating-point"):
        a.all_reduce(torch.ones(2, dtype=torch.int64), op="mean")
    a.close()
    with pytest.raises(TransportClosedError):
        a.recv(src=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        DistTransport.init(rank=0, world_size=1, master_port=1234, backend="mpi")


def test_local_collectives_over_threads() -> None:
    hub = LocalHub(3, timeout=5.0)
    results: dict[int, list[torch.Tensor]] = {}

    def rank_fn(rank: int) -> Callable[[], None]:
        def run() -> None:
            t = hub.transport(rank)
            pair = t.new_group([0, 2])
            s = torch.full((2,), float(rank + 1))
            t.all_reduce(s)  # 1 + 2 + 3
            m = torch.full((2, 2), float(rank)).t()  # non-contiguous input, reduced in place
            t.all_reduce(m, op="mean")
            p = torch.tensor([rank])
            if rank in pair.ranks:
                t.all_reduce(p, group=pair)  # 0 + 2
            b = torch.arange(3.0) * (rank + 1)
            t.broadcast(b, src=2)
            t.barrier(timeout=5.0)
            results[rank] = [s, m, p, b]

        return run

    _threads([rank_fn(r) for r in range(3)])
    for rank, (s, m, p, b) in results.items():
        assert torch.equal(s, torch.full((2,), 6.0)) and torch.equal(m, torch.full((2, 2), 1.0))
        assert p.item() == (2 if rank in (0, 2) else rank)
        assert torch.equal(b, torch.arange(3.0) * 3)


def test_local_collective_timeout_names_missing_rank() -> None:
    hub = LocalHub(2, timeout=5.0)
    with pytest.raises(CommTimeoutError, match=r"all_reduce timed out after 0.3 s.*never heard from ranks \[1\]"):
        hub.transport(0).all_reduce(torch.ones(1), timeout=0.3)


# --- DistTransport on gloo: two real processes per test (module-level workers: spawned children import them)

_DEADLINE = 30.0  # hang guard per spawned test; a run normally takes ~3 s (mostly two `import torch`)


def _init(rank: int, world_size: int, port: int) -> DistTransport:
    torch.set_num_threads(1)
    return DistTransport.init(rank=rank, world_size=world_size, master_port=port, timeout=10.0)


def _roundtrip_worker(rank: int, world_size: int, port: int) -> None:
    with _init(rank, world_size, port) as t:
        cases, peer = _cases(), 1 - rank
        for tag, name in enumerate(sorted(cases)):
            # Both ranks isend before they recv: gloo sends are rendezvous, so this needs isend to really overlap.
            handle = t.isend(cases[name], dst=peer, tag=tag)
            got = t.recv(src=peer, tag=tag, timeout=10.0)
            handle.wait(10.0)
            _assert_same(cases[name], got, name)
        if rank == 0:  # boundary check: a (2, 4) arrives where (2, 3) is expected
            t.send([torch.zeros(2, 4), 5], dst=1, tag=99)
            t.send([torch.ones(2, 3), 6], dst=1, tag=99)
        else:
            with pytest.raises(BoundaryMismatchError, match=r"value 0 .*received shape \(2, 4\)"):
                t.recv(src=0, tag=99, expect=[((2, 3), torch.float32), int])
            x, n = t.recv(src=0, tag=99, expect=[((2, 3), torch.float32), int])  # the channel is still in step
            assert n == 6 and torch.equal(x, torch.ones(2, 3))
        t.barrier(timeout=10.0)


def test_dist_roundtrip_and_boundary_check_gloo() -> None:
    spawn(_roundtrip_worker, 2, timeout=_DEADLINE)


def _reuse_worker(rank: int, world_size: int, port: int) -> None:
    with _init(rank, world_size, port) as t:
        if rank == 0:
            x = torch.zeros(4)
            handle = t.isend([x, 0], dst=1, tag=1)
            x += 1  # after isend: small tensors were copied into the message
            handle.wait(10.0)
            for k in range(1, 6):
                t.send([torch.full((2, 3), float(k)), torch.arange(k + 1), k, k / 2], dst=1, tag=1, timeout=10.0)
        else:
            x, zero = t.recv(src=0, tag=1, timeout=10.0)
            assert torch.equal(x, torch.zeros(4)) and zero == 0
            got = [t.recv(src=0, tag=1, timeout=10.0) for _ in range(5)]
            # Every message landed in the same reused buffer: message k's values must survive messages k+1..5.
            for k, (a, b, n, f) in enumerate(got, start=1):
                assert torch.equal(a, torch.full((2, 3), float(k))) and torch.equal(b, torch.arange(k + 1)), k
                assert (n, f) == (k, k / 2)
            assert len({v.untyped_storage().data_ptr() for m in got for v in m[:2]}) == 10  # each owns its storage
            got[0][0].add_(100)
            assert torch.equal(got[0][1], torch.arange(2)) and torch.equal(got[1][0], torch.full((2, 3), 2.0))
        t.barrier(timeout=10.0)


def test_dist_received_values_survive_later_messages() -> None:
    spawn(_reuse_worker, 2, timeout=_DEADLINE)


def _post_recv_worker(rank: int, world_size: int, port: int) -> None:
    with _init(rank, world_size, port) as t:
        big = torch.arange(40_000, dtype=torch.float32).reshape(200, 200)  # beyond the first message: a 2nd transfer
        if rank == 0:
            t.barrier(timeout=10.0)  # rank 1 has posted its receives
            sends = [t.isend([tag, torch.full((2, 3), float(tag)), big * tag], dst=1, tag=tag)
                     for tag in (5, 3, 4)]  # out of the order they were posted and received in
            sends.append(t.isend([9, torch.ones(1)], dst=1, tag=9))  # never posted ahead: the plain path
            for handle in sends:
                handle.wait(10.0)
        else:
            for tag in (3, 4, 5):
                t.post_recv(src=0, tag=tag)
            t.post_recv(src=0, tag=3)  # posting twice is one receive
            t.barrier(timeout=10.0)
            got = {tag: t.recv(src=0, tag=tag, timeout=10.0) for tag in (4, 3, 5)}
            for tag, values in got.items():
                assert values[0] == tag and torch.equal(values[1], torch.full((2, 3), float(tag)))
                assert torch.equal(values[2], big * tag)
            assert got[3][1].data_ptr() != got[4][1].data_ptr()  # each message its own storage
            last = t.recv(src=0, tag=9, timeout=10.0)
            assert last[0] == 9 and torch.equal(last[1], torch.ones(1))
        t.barrier(timeout=10.0)


def test_dist_post_recv_receives_ahead_on_any_tag_order() -> None:
    spawn(_post_recv_worker, 2, timeout=_DEADLINE)


def _timeout_worker(rank: int, world_size: int, port: int, done: Any) -> None:
    t = _init(rank, world_size, port)
    if rank == 1:
        t0 = time.monotonic()
        try:
            t.recv(src=0, tag=7, timeout=1.0)
        except CommTimeoutError as exc:
            waited = time.monotonic() - t0
            assert 0.9 < waited < 4.0, waited
            assert "rank 1: recv from rank 0 (tag 7) timed out after 1.0 s" in str(exc)
        else:
            raise AssertionError("recv returned although nothing was sent")
        finally:
            done.set()
    else:
        assert done.wait(10.0), "rank 1 never finished its recv"
    # The gloo link is closed after a timeout, so no barrier here; close() must not hang regardless.
    t.close()


def test_dist_recv_timeout() -> None:
    done = multiprocessing.get_context("spawn").Event()
    spawn(_timeout_worker, 2, args=(done,), timeout=_DEADLINE)


def _collective_worker(rank: int, world_size: int, port: int) -> None:
    with _init(rank, world_size, port) as t:
        s, i, b = torch.full((3,), float(rank + 1)), torch.tensor([rank + 10]), torch.full((2,), float(rank))
        m = (torch.arange(6.0).reshape(2, 3) * (rank + 1)).t()  # non-contiguous, reduced in place
        t.all_reduce(s, op="sum")
        t.all_reduce(m, op="mean")
        t.all_reduce(i)
        t.broadcast(b, src=1)
        assert torch.equal(s, torch.full((3,), 3.0)) and i.item() == 21 and torch.equal(b, torch.ones(2))
        assert torch.allclose(m, (torch.arange(6.0).reshape(2, 3) * 1.5).t()), m
        solo = t.new_group([1])  # every rank calls new_group; only rank 1 is a member
        if rank == 1:
            x = torch.ones(2)
            t.all_reduce(x, group=solo)
            assert torch.equal(x, torch.ones(2))
        t.barrier(timeout=10.0)


def test_dist_all_reduce_and_broadcast() -> None:
    spawn(_collective_worker, 2, timeout=_DEADLINE)


def _failing_worker(rank: int, world_size: int, port: int, pid_dir: str) -> None:
    Path(pid_dir, f"{rank}.tmp").write_text(str(os.getpid()))
    os.replace(Path(pid_dir, f"{rank}.tmp"), Path(pid_dir, f"{rank}.pid"))
    if rank == 1:
        for _ in range(200):  # let rank 0 record its pid first, so the test can check it was killed
            if Path(pid_dir, "0.pid").exists():
                break
            time.sleep(0.1)
        raise ValueError("boom on rank 1")
    time.sleep(60)  # rank 0 would outlive the test: spawn must kill it


def test_spawn_propagates_failure_and_kills_the_rest(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(SpawnError) as ei:
        spawn(_failing_worker, 2, args=(str(tmp_path),), timeout=_DEADLINE)
    assert time.monotonic() - t0 < _DEADLINE - 5  # did not wait for rank 0's 60 s sleep nor the deadline
    assert not ei.value.timed_out and list(ei.value.failures) == [1]
    assert "rank 1 failed" in str(ei.value) and "ValueError: boom on rank 1" in str(ei.value)
    assert "_failing_worker" in ei.value.failures[1]  # the traceback text, not just the message
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("*.pid"))]
    assert len(pids) == 2 and not any(Path(f"/proc/{p}").exists() for p in pids)  # killed and reaped
    assert multiprocessing.active_children() == []


def _sleeping_worker(rank: int, world_size: int, port: int) -> None:
    time.sleep(60)


def test_spawn_deadline_kills_everything() -> None:
    t0 = time.monotonic()
    with pytest.raises(SpawnError, match=r"deadline of 2.0 s passed with ranks \[0, 1\] still running") as ei:
        spawn(_sleeping_worker, 2, timeout=2.0)
    assert ei.value.timed_out and time.monotonic() - t0 < 7.0
    assert multiprocessing.active_children() == []
