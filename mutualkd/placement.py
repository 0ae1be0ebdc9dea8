"""Placement: what crosses processes. Terms see the same tensors whatever the process count.

Data-parallel (the default) splits each global batch over ranks. Per-sample losses need nothing; batch-coupled
ones (in-batch contrast, the NCE normaliser, memory-bank updates) use the global batch through these helpers,
which are identities in a single process (METHODS.md §0.5).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


class _GatherKeepLocal(torch.autograd.Function):
    """All-gather along `dim`; backward returns world_size x the gradient of the local slice.

    Every rank computes the same global-batch loss but backpropagates only into its own shard; DDP then
    averages over ranks, so the factor world_size makes the result the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim, ctx.size = dim, x.shape[dim]
        return _all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, size = world()
        return grad.narrow(ctx.dim, rank * ctx.size, ctx.size) * size, None


def gather_batch(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The global batch of `x` (equal shards per rank), gradient flowing into the local shard only."""
    if world()[1] == 1:
        return x
    if not x.requires_grad:
        return _all_gather(x, dim)
    return _GatherKeepLocal.apply(x, dim)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` across ranks (no gradient): for normalisers computed from per-rank statistics."""
    if world()[1] == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world()[1]
