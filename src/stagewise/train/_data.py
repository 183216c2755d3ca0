"""Data distribution: which samples each replica reads each step, sharded or replicated, deterministic and seeded."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .._spec import sample_to_call  # re-exported: the data helpers of training read samples this way
from ..split import input_leaves
from ._config import DataConfig
from ._device import to_device

__all__ = ["ReplicaBatches", "global_batches", "rank_microbatches", "sample_to_call", "split_microbatches"]


def _epoch_order(n: int, *, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batches(n: int, *, global_batch: int, steps: int, seed: int, shuffle: bool,
                   start_step: int = 0) -> Iterator[list[int]]:
    """Sample indices of every global batch: each epoch is a seeded permutation covered once (last partial batch
    of an epoch is dropped), epochs follow each other."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the data set has {n} samples, fewer than one global batch of {global_batch}; "
                         "lower --global-batch")
    for step in range(start_step, steps):
        epoch, k = divmod(step, per_epoch)
        order = _epoch_order(n, epoch=epoch, seed=seed, shuffle=shuffle)
        yield order[k * global_batch:(k + 1) * global_batch]


class _StepSampler(Sampler[list[int]]):
    def __init__(self, batches: Sequence[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Subset(Dataset):
    """Only the samples a replica reads (``shard``): indices are remapped, nothing else is touched."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


class ReplicaBatches:
    """The batches of one replica: slice ``replica`` of every global batch (drawn as ``data`` says), loaded by a
    DataLoader."""

    def __init__(self, dataset: Dataset, *, data: DataConfig, replica: int, replicas: int, steps: int,
                 start_step: int = 0) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        per = data.global_batch // replicas
        mine = [b[replica * per:(replica + 1) * per]
                for b in global_batches(n, global_batch=data.global_batch, steps=steps, seed=data.seed,
                                        shuffle=data.shuffle, start_step=start_step)]
        if data.sharding == "shard":
            needed = sorted({i for b in mine for i in b})
            where = {idx: j for j, idx in enumerate(needed)}
            dataset = _Subset(dataset, needed)
            mine = [[where[i] for i in b] for b in mine]
        self.loader = DataLoader(dataset, batch_sampler=_StepSampler(mine), num_workers=data.num_workers,
                                 collate_fn=default_collate)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


def split_microbatches(batch: Any, microbatches: int) -> list[Any]:
    """Cut a collated batch ``(inputs, targets)`` into ``microbatches`` equal pieces along dim 0."""

    def cut(x: Any) -> list[Any]:
        if isinstance(x, torch.Tensor):
            if x.shape[0] % microbatches:
                raise ValueError(f"batch of {x.shape[0]} rows does not divide into {microbatches} microbatches")
            return list(x.chunk(microbatches))
        if isinstance(x, dict):
            parts = {k: cut(v) for k, v in x.items()}
            return [{k: parts[k][i] for k in x} for i in range(microbatches)]
        if isinstance(x, (list, tuple)):
            parts2 = [cut(v) for v in x]
            return [type(x)(p[i] for p in parts2) for i in range(microbatches)]
        return [x] * microbatches

    return cut(batch)


def rank_microbatches(batch: Any, *, needed: Collection[str], microbatches: int,
                      device: torch.device) -> tuple[list[dict[str, Any]], list[Any]]:
    """``(inputs, targets)`` per microbatch of a collated batch ``(inputs, targets)`` for one rank: only the input
    leaves its stages read (``needed``, by :func:`~stagewise.split.input_leaves` name), on ``device``.

    The batch moves to a GPU in one copy per tensor, then is cut into microbatches (views of those copies), rather than
    copying every microbatch on its own; on the CPU nothing is copied.
    """
    batch_inputs, targets = batch
    a, k = sample_to_call(batch_inputs)
    leaves, names, _ = input_leaves(a, k)
    inputs = {n: t for n, t in zip(names, leaves) if n in needed}
    if device.type != "cpu":
        inputs, targets = to_device((inputs, targets), device)
    cut = split_microbatches((inputs, targets), microbatches)
    return [i for i, _ in cut], [t for _, t in cut]
