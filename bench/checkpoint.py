"""Benchmark checkpoint save/load throughput against a plain ``torch.save``/``torch.load`` of the same state dict.

Run: ``PYTHONPATH=src python bench/checkpoint.py [--mb 256] [--parts 1] [--dir DIR]``. Both writers go to the same
directory and are fsynced (ours: every file, the manifest and the directories, plus the sha256 of every file;
torch.save: its one file); before each timed save the previous output is deleted and ``os.sync()`` run, so
every save starts from an idle disk. Loads are timed cold (the files' pages dropped from the page cache first, so the
bytes come from the disk, as on a resume) and warm. Each measurement is the best of ``--repeats`` interleaved runs
(the machine may be shared; medians are printed too). The last line is machine-readable:
``checkpoint save_gbps=S load_gbps=L ratio_vs_torch_save=R`` where S and L are our save and cold load (verifying every
sha256) throughputs in GB/s and R is S over torch.save's save throughput.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stagewise.checkpoint import CheckpointWriter, load_checkpoint


def make_state(mb: int, tensors: int) -> dict[str, torch.Tensor]:
    """``tensors`` float32 tensors of about ``mb`` MB together, named like a transformer's weights."""
    per = mb * 1_000_000 // 4 // tensors
    cols = 4096
    g = torch.Generator().manual_seed(0)
    return {f"transformer.h.{i}.mlp.c_fc.weight": torch.randn(per // cols, cols, generator=g) for i in range(tensors)}


def drop_cache(paths: list[Path]) -> None:
    """Evict the (clean, fsynced) pages of these files so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], None], before: Callable[[], None] | None = None) -> float:
    """Seconds ``fn`` takes, after running ``before`` (untimed)."""
    if before is not None:
        before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the state dict in MB (default: 256)")
    parser.add_argument("--tensors", type=int, default=8, help="number of tensors (default: 8)")
    parser.add_argument("--parts", type=int, default=1,
                        help="save the state dict as this many parts from parallel threads, like stages (default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs; the best is reported (default: 5)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    state = make_state(args.mb, args.tensors)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    names = list(state)
    parts = {f"stage{i}": {k: state[k] for k in names[i :: args.parts]} for i in range(args.parts)}
    base = Path(tempfile.mkdtemp(prefix="stagewise-bench-", dir=args.dir))
    torch_file = base / "state.pt"
    sample = os.urandom(64 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(sample).digest()
    sha_gbps = len(sample) / 1e9 / (time.perf_counter() - t0)
    print(f"state dict: {len(state)} float32 tensors, {nbytes / 1e6:.0f} MB, as {args.parts} part(s); "
          f"writing under {base}; this CPU hashes sha256 at {sha_gbps:.2f} GB/s")

    times: dict[str, list[float]] = {k: [] for k in ("ours_save", "torch_save", "ours_load_cold", "ours_load_read",
                                                     "torch_load_cold", "ours_load_warm", "torch_load_warm")}
    try:
        for r in range(args.repeats):
            root = base / "ours"

            def ours_save() -> None:
                writer = CheckpointWriter(root, keep=None)
                if args.parts == 1:
                    writer.save(1, tensors=parts["stage0"], part="stage0")
                    return
                import concurrent.futures

                with concurrent.futures.ThreadPoolExecutor(args.parts) as pool:
                    list(pool.map(lambda kv: writer.save_part(1, part=kv[0], tensors=kv[1]), parts.items()))
                writer.commit(1, parts=list(parts))

            def torch_save() -> None:
                with open(torch_file, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())

            def quiet(old: Path) -> Callable[[], None]:
                def run() -> None:  # each save starts from an idle disk: no old output to free, nothing dirty queued
                    shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
                    os.sync()
                return run

            order = [("ours_save", ours_save, root), ("torch_save", torch_save, torch_file)]
            for key, fn, out in order if r % 2 == 0 else order[::-1]:
                times[key].append(timed(fn, quiet(out)))
            ours_files = sorted((root / "step-00000001").iterdir())

            def ours_load(verify: str = "all") -> Callable[[], None]:
                def run() -> None:
                    got = load_checkpoint(root, verify=verify).tensors()  # type: ignore[arg-type]
                    assert len(got) == len(state)
                return run

            def torch_load() -> None:
                got = torch.load(torch_file, weights_only=True)
                assert len(got) == len(state)

            times["ours_load_cold"].append(timed(ours_load(), lambda: drop_cache(ours_files)))
            times["ours_load_read"].append(timed(ours_load("read"), lambda: drop_cache(ours_files)))
            times["torch_load_cold"].append(timed(torch_load, lambda: drop_cache([torch_file])))
            times["ours_load_warm"].append(timed(ours_load()))
            times["torch_load_warm"].append(timed(torch_load))
        check = base / "check"
        CheckpointWriter(check).save(1, tensors=state)
        again = load_checkpoint(check).tensors()
        assert all(torch.equal(again[k], state[k]) for k in state), "round trip changed a tensor"
    finally:
        shutil.rmtree(base, ignore_errors=True)

    gbps = {k: nbytes / 1e9 / min(v) for k, v in times.items()}
    median = {k: nbytes / 1e9 / statistics.median(v) for k, v in times.items()}
    print(f"medians: save ours {median['ours_save']:.3f} / torch.save {median['torch_save']:.3f} GB/s; cold load ours "
          f"{median['ours_load_cold']:.3f} / torch.load {median['torch_load_cold']:.3f} GB/s")
    print(f"save  ours {gbps['ours_save']:.3f} GB/s (sha256 + fsync)   torch.save {gbps['torch_save']:.3f} GB/s "
          "(fsync)")
    print(f"load cold  ours {gbps['ours_load_cold']:.3f} GB/s (verify=all), {gbps['ours_load_read']:.3f} GB/s "
          f"(verify=read, one pass)   torch.load {gbps['torch_load_cold']:.3f} GB/s")
    print(f"load warm  ours {gbps['ours_load_warm']:.3f} GB/s (verify=all)   torch.load "
          f"{gbps['torch_load_warm']:.3f} GB/s")
    print(f"checkpoint save_gbps={gbps['ours_save']:.3f} load_gbps={gbps['ours_load_cold']:.3f} "
          f"ratio_vs_torch_save={gbps['ours_save'] / gbps['torch_save']:.3f}")


if __name__ == "__main__":
    main()
