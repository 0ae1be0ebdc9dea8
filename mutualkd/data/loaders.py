"""DataLoaders over datasets that hand out whole batches (``__getitems__``): training batches chosen by a
batch sampler, evaluation batches in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mutualkd.data.samplers import TrainBatchSampler
from mutualkd.errors import UserError


def _worker_init(worker_id: int) -> None:
    """Keep each loader worker to one intra-op thread so workers do not oversubscribe the CPU."""
    torch.set_num_threads(1)


def _loader(dataset: Dataset, batch_sampler: Any, num_workers: int) -> DataLoader:
    # A private generator: every iter() of a DataLoader draws a seed from it; from the global stream that draw
    # would shift dropout masks between an uninterrupted and a resumed run.
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=identity_collate, num_workers=num_workers,
                      persistent_workers=num_workers > 0, worker_init_fn=_worker_init if num_workers > 0 else None,
                      generator=torch.Generator().manual_seed(0))


def make_train_loader(dataset: Dataset, batch_sampler: TrainBatchSampler, num_workers: int = 0) -> DataLoader:
    """Training DataLoader: batches of dicts (image/target/index) chosen by ``batch_sampler``."""
    return _loader(dataset, batch_sampler, num_workers)


def make_eval_loader(dataset: Dataset, batch_size: int, indices: Sequence[int], num_workers: int = 0) -> DataLoader:
    """Evaluation DataLoader: consecutive batches of ``batch_size`` over ``indices``, in order, last one partial."""
    if batch_size < 1:
        raise UserError(f"data.eval_batch_size: must be >= 1, got {batch_size}")
    indices = list(indices)
    return _loader(dataset, [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)], num_workers)


def identity_collate(batch: Any) -> Any:
    """DataLoader collate for datasets whose ``__getitems__`` already returns a batch dict."""
    return batch
