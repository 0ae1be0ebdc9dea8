"""Batch samplers: rank-aware random and m-per-class training batches, and evaluation shards."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from mutualkd.data.datasets import class_members
from mutualkd.errors import UserError

SAMPLERS = ("random", "m_per_class")


class TrainBatchSampler:
    """Yields each rank's share of global training batches, deterministic from (seed, epoch).

    A global batch has ``batch_size * world_size`` samples; rank r gets the contiguous slice
    ``[r*batch_size:(r+1)*batch_size]``, so all ranks together see exactly the single-process batch.
    Only full global batches are produced (drop_last). ``kind="random"``: one permutation per epoch;
    ``kind="m_per_class"``: each global batch has ``global_batch // m`` random distinct classes with m
    samples each, drawn without replacement per class until the class's pool is exhausted and refilled.

    ``start_batch``: the next iteration skips that many batches (only indices are computed, no data is
    touched) and resets it to 0 - for resuming mid-epoch. ``len()`` is always the full epoch.
    """

    def __init__(self, targets: torch.Tensor | Sequence[int], batch_size: int, seed: int, kind: str = "random",
                 m: int = 2, rank: int = 0, world_size: int = 1) -> None:
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        self.batch_size, self.seed, self.kind, self.m = batch_size, seed, kind, m
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0
        n, gb = len(self.targets), batch_size * world_size
        if kind not in SAMPLERS:
            raise UserError(f"data.sampler: unknown kind {kind!r} (allowed: {', '.join(SAMPLERS)})")
        if batch_size < 1:
            raise UserError(f"data.batch_size: must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if gb > n:
            raise UserError(f"data.batch_size: global batch {gb} (batch_size {batch_size} x {world_size} ranks) "
                            f"exceeds the {n} training samples")
        if kind == "m_per_class":
            self._members = class_members(self.targets)
            classes = len(self._members)
            if m < 1 or gb % m:
                raise UserError(f"data.m_per_class: global batch {gb} (data.batch_size {batch_size} x {world_size} "
                                f"ranks) is not a multiple of m={m}")
            if gb // m > classes:
                raise UserError(f"data.m_per_class: global batch {gb} / m={m} needs {gb // m} classes, "
                                f"only {classes} exist (lower data.batch_size or raise data.m_per_class)")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets) // (self.batch_size * self.world_size)

    def _global_batches(self) -> torch.Tensor:
        """All global batches of the current epoch as ``[num_batches, global_batch]`` indices."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        nb, gb = len(self), self.batch_size * self.world_size
        if self.kind == "random":
            return torch.randperm(len(self.targets), generator=g)[: nb * gb].view(nb, gb)
        m, members = self.m, self._members
        pools: list[list[int]] = [[] for _ in members]
        batches = []
        for _ in range(nb):
            batch: list[int] = []
            for c in torch.randperm(len(members), generator=g)[: gb // m].tolist():
                pool = pools[c]
                while len(pool) < m:  # refill: a fresh permutation, the leftovers' copies moved to its back
                    fresh = members[c][torch.randperm(len(members[c]), generator=g)].tolist()
                    left = set(pool)
                    pool += [i for i in fresh if i not in left] + [i for i in fresh if i in left]
                batch += pool[:m]
                del pool[:m]
            batches.append(batch)
        return torch.tensor(batches, dtype=torch.int64)

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start_batch = self.start_batch, 0
        if not 0 <= start <= len(self):
            raise UserError(f"resume: start_batch {start} outside the {len(self)} batches per epoch "
                            f"(did data.batch_size or the dataset change?)")
        lo = self.rank * self.batch_size
        for batch in self._global_batches()[start:]:
            yield batch[lo: lo + self.batch_size].tolist()


def eval_indices(n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Rank r's contiguous block of ``range(n)``; block sizes differ by at most one, union is everything."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))
