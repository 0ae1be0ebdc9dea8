"""MCL-OKD's memory-bank NCE (METHODS.md §1.6): peer j's embedding scored against peer i's bank, for every
ordered pair i != j, with one bank gather per peer and one einsum for all partners.

One bank per peer ([P, N, d], non-trainable state of this term). Negatives are K dataset indices of other
classes, drawn on device from a class-sorted permutation. Scores use the pre-update rows; the momentum update
of the positives' rows runs after the optimizer step (`after_step`), from every rank's (index, embedding)
pairs, so data-parallel replicas of the banks stay identical.

    embedding: {head: linear, dim: 128}
    topology: {kind: shared_stem, split: 1}
    objective:
      terms:
        - {name: ce}
        - {name: dot, T: 3.0}
        - {name: mcl_okd, weight: 0.025, K: 256, tau: 0.1, momentum: 0.5}
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mutualkd.config import TermConfig
from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.base import Term, TermRNG
from mutualkd.registry import register_term


class MCLOKDConfig(TermConfig):
    """MCL-OKD memory-bank NCE (METHODS §1.6): peer j's embedding against peer i's bank, i != j."""

    name: Literal["mcl_okd"] = "mcl_okd"
    weight: float = Field(0.025, ge=0.0)  # beta, with pair_reduction "sum"
    tau: float = Field(0.1, gt=0.0)
    K: int = Field(256, ge=1)  # negatives per anchor, drawn from other classes
    momentum: float = Field(0.5, ge=0.0, lt=1.0)
    pair_reduction: Literal["sum", "mean"] = "sum"
    eps: float = Field(1e-7, gt=0.0)
    nce_global_norm: bool = True  # data-parallel: the normaliser's mean over all ranks


ROWS_BUDGET = 1 << 24  # gathered bank-row elements alive at once (64 MB in fp32)


def _chunks(rows: torch.Tensor, d: int) -> list[slice]:
    """Batch slices whose gathered rows ([b, K+1, d]) stay within ROWS_BUDGET elements."""
    step = max(1, ROWS_BUDGET // (rows.shape[1] * d))
    return [slice(b, b + step) for b in range(0, rows.shape[0], step)]


class _BankScores(torch.autograd.Function):
    """s[i, j, b, k] = exp(<banks[i, rows[b, k]], v[j, b]> / tau), gathered one bank and batch chunk at a time.

    All P banks' rows at once would be [P, B, K+1, d] (2.1 GB at P 4, B 64, K 16384, d 128) and autograd would
    keep them for backward. Here at most ROWS_BUDGET elements are gathered at a time and backward gathers them
    again. The banks must not change between forward and backward (MCLOKD defers its update to after the step).
    """

    @staticmethod
    def forward(ctx, v, banks, rows, tau):
        scores = v.new_empty(banks.shape[0], v.shape[0], *rows.shape)
        for i in range(banks.shape[0]):
            for c in _chunks(rows, banks.shape[-1]):
                scores[i, :, c] = MF.bank_scores(banks[i, rows[c]][None], v[:, c], tau)[0]
        ctx.save_for_backward(v, scores, rows)
        ctx.banks, ctx.tau = banks, tau
        return scores

    @staticmethod
    def backward(ctx, grad):
        v, scores, rows = ctx.saved_tensors
        g = grad * scores / ctx.tau  # d exp(u / tau) / du
        grad_v = torch.zeros_like(v)
        for i in range(ctx.banks.shape[0]):
            for c in _chunks(rows, ctx.banks.shape[-1]):
                grad_v[:, c] += torch.einsum("jbk,bkd->jbd", g[i, :, c], ctx.banks[i, rows[c]])
        return grad_v, None, None, None


@register_term("mcl_okd", MCLOKDConfig)
class MCLOKD(Term):
    """Memory-bank NCE between peers: peer j's embedding scored against peer i's bank, i != j (module docstring)."""

    needs_embeddings = True
    peer_parallel = True
    min_peers = 2

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        targets = ctx.train_targets.long()
        n, d = len(targets), ctx.embedding_dim
        counts = torch.bincount(targets, minlength=ctx.num_classes)
        if cfg.K > n - int(counts.max()):
            raise UserError(
                f"{key}.K: {cfg.K} negatives per anchor exceed the {n - int(counts.max())} samples "
                "outside the largest class of the training split"
            )
        bound = 1.0 / (d / 3) ** 0.5  # CRD's initialisation, uniform in [-a, a]
        self.register_buffer("banks", torch.rand(self.num_peers, n, d).mul_(2 * bound).sub_(bound))
        self.register_buffer("by_class", torch.argsort(targets, stable=True), persistent=False)
        self.register_buffer("starts", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("counts", counts, persistent=False)
        self.register_buffer("off_diagonal", ~torch.eye(self.num_peers, dtype=torch.bool), persistent=False)
        self.rng = TermRNG(ctx.seed * 7919 + ctx.rank)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (index, embeddings) of each forward

    def sample_negatives(self, y: torch.Tensor) -> torch.Tensor:
        """[B, K] indices drawn uniformly from the classes other than each anchor's own."""
        outside = (self.by_class.numel() - self.counts[y]).unsqueeze(1)  # N - n_y
        u = torch.rand(y.shape[0], self.cfg.K, generator=self.rng(y.device), device=y.device)
        r = (u * outside).long().clamp_max(outside - 1)
        start = self.starts[y].unsqueeze(1)
        r = r + (r >= start) * self.counts[y].unsqueeze(1)  # skip the anchor's class block
        return self.by_class[r]

    def forward(self, out, batch, teach=None):
        cfg = self.cfg
        v = out.embeddings.float()
        idx = batch["index"]
        rows = torch.cat([idx.unsqueeze(1), self.sample_negatives(batch["target"])], dim=1)  # [B, K+1]
        scores = _BankScores.apply(v, self.banks, rows, cfg.tau)  # [P_bank, P_emb, B, K+1]
        mean = self.placement.mean_over_ranks(scores.detach().mean(dim=(-2, -1))) if cfg.nce_global_norm else None
        nce = MF.nce_loss(scores, self.banks.shape[1], eps=cfg.eps, mean_score=mean) * self.off_diagonal
        per_peer = nce.sum(0)  # attributed to the peer whose embedding is scored
        if cfg.pair_reduction == "mean":  # mean over the P(P-1) ordered pairs
            per_peer = per_peer / (self.num_peers * (self.num_peers - 1))
        if self.training:
            self._pending.append((idx, v.detach()))
        return {"loss": per_peer.sum(), "per_peer": per_peer}

    @torch.no_grad()
    def after_step(self) -> None:
        """Momentum update of the positives' rows with every rank's (index, embedding) pairs, forward by forward."""
        pending, self._pending = self._pending, []
        for idx, v in pending:
            idx, v = self.placement.gather_batch(idx), self.placement.gather_batch(v, 1)
            mixed = self.banks[:, idx] * self.cfg.momentum + v * (1 - self.cfg.momentum)
            self.banks[:, idx] = F.normalize(mixed, dim=-1)

    def get_extra_state(self):
        return self.rng.state()

    def set_extra_state(self, state):
        self.rng.load(state)
