"""Placement: which process runs which peer, and what crosses processes. Terms see the same tensors either way.

- `data_parallel` (default): every rank runs every peer on its shard of the global batch (DDP). Per-sample
  losses need nothing; batch-coupled ones (in-batch contrast, the NCE normaliser, memory-bank updates) use the
  global batch through `gather_batch` / `mean_over_ranks` (METHODS.md §0.5).
- `peer_parallel`: rank r runs only its block of peers on the whole global batch (every rank draws the same
  batches and augmentations); peers exchange only logits and embeddings through a differentiable all-gather,
  as large-scale codistillation does. Each rank backpropagates the (identical) objective scaled by 1/W; the
  gather's backward sums the W contributions onto each peer's owner, so gradients equal single-process ones.

A `Placement` is built once per run and handed to whoever needs it (peer group, terms, evaluation, trainer).
In a single process every collective is the identity.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

from mutualkd.errors import UserError


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
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


class Placement:
    """The run's placement (`data_parallel` or `peer_parallel`) over the current process group."""

    def __init__(self, kind: str = "data_parallel"):
        if kind not in ("data_parallel", "peer_parallel"):
            raise ValueError(f"placement: unknown kind {kind!r}")
        self.kind = kind

    @property
    def peer_parallel(self) -> bool:
        return self.kind == "peer_parallel"

    def data_world(self) -> tuple[int, int]:
        """(rank, world size) over which the data is split: every rank sees all the data in peer_parallel."""
        return (0, 1) if self.peer_parallel else world()

    def local_peers(self, num_peers: int) -> list[int]:
        """The global indices of the peers this process runs."""
        rank, size = world()
        if not self.peer_parallel or size == 1:
            return list(range(num_peers))
        if num_peers % size:
            raise UserError(f"placement: peer_parallel needs a number of peers divisible by the {size} processes, "
                            f"the config has {num_peers}")
        block = num_peers // size
        return list(range(rank * block, (rank + 1) * block))

    # ---------------------------------------------------------------------------------- global batch
    def gather_batch(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The global batch of `x` (equal shards per rank), gradient flowing into the local shard only."""
        if self.data_world()[1] == 1:
            return x
        if not x.requires_grad:
            return _all_gather(x, dim)
        return _GatherKeepLocal.apply(x, dim)

    def sum_over_data_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a per-shard tensor over the data ranks (no gradient), e.g. evaluation counts."""
        if self.data_world()[1] == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x)
        return x

    def mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of a per-shard statistic over the data ranks (no gradient), e.g. the NCE normaliser."""
        return self.sum_over_data_ranks(x) / self.data_world()[1]

    # ------------------------------------------------------------------------ state outside DDP
    def average_buffers(self, module: torch.nn.Module) -> None:
        """data_parallel: average floating buffers (BatchNorm statistics) over ranks, in place.

        DDP broadcasts rank 0's buffers before each forward, then every rank updates them from its own shard, so
        after a step the ranks disagree. Averaging before evaluation and checkpoints makes every rank evaluate the
        model that is saved, with statistics from the whole global batch.
        """
        size = self.data_world()[1]
        if size == 1:
            return
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(size)

    def average_grads(self, params) -> None:
        """data_parallel: average the gradients of parameters DDP does not wrap (loss adapters, discriminators)
        over the ranks, as DDP does for the peers'."""
        size = self.data_world()[1]
        if size == 1:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(size)

    # --------------------------------------------------------------------------- peer exchange
    def exchange(self, out):
        """peer_parallel: the group output of all peers from each rank's local peers (logits and embeddings only;
        pre-logits and taps stay local). Differentiable when gradients are enabled.

        Logits and embeddings travel in ONE all-gather. With two differentiable gathers (each running a collective
        in backward) the embeddings' gradients came out wrong on 2 gloo ranks; with one, training matches a single
        process (tests/test_distributed.py). One collective per step is also the cheaper exchange.
        """
        if not self.peer_parallel or world()[1] == 1:
            return out
        parts = [out.logits.float()] + ([out.embeddings] if out.embeddings is not None else [])
        both = torch.cat(parts, dim=-1).contiguous()
        gathered = torch.cat(dist_nn.all_gather(both)) if torch.is_grad_enabled() else _all_gather(both, 0)
        logits, emb = gathered.split([out.logits.shape[-1], gathered.shape[-1] - out.logits.shape[-1]], dim=-1)
        return dataclasses.replace(out, logits=logits, embeddings=emb if out.embeddings is not None else None)

    def loss_scale(self) -> float:
        """Factor on the loss before backward: 1/W in peer_parallel, where every rank holds the same objective."""
        return 1.0 / world()[1] if self.peer_parallel else 1.0

    def clip_grad_norm_(self, params, max_norm: float) -> None:
        """peer_parallel: clip by the norm over every rank's peers, as a single process would."""
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
        if world()[1] > 1:
            dist.all_reduce(total)
        coef = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
