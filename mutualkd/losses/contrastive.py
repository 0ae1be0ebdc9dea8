"""Contrastive peer terms: MCL's in-batch contrast (METHODS §1.7) and MCL-OKD's memory-bank NCE (§1.6).

Both run over all ordered peer pairs at once on stacked embeddings V [P, B, d]: MCL on the P×P grid of
B×B similarity blocks, MCL-OKD with one bank gather for all peers and one einsum for all pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.objective import Term, TermRNG, register
from mutualkd.placement import gather_batch, mean_over_ranks


class _Contrastive(Term):
    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        if ctx.embedding_dim is None:
            raise UserError(f"{key} ({cfg.name}): needs peer embeddings; set embedding.head to linear or mlp")
        if self.num_peers < 2:
            raise UserError(f"{key} ({cfg.name}): needs at least 2 peers, the config has {self.num_peers}")
        off = ~torch.eye(self.num_peers, dtype=torch.bool)
        self.register_buffer("off_diagonal", off, persistent=False)

    def pair_sum(self, grid: torch.Tensor, reduction: str) -> torch.Tensor:
        """Per-anchor-peer sum of a [P, P] grid over partners b != a, times rho (1/(P-1) for "mean")."""
        rho = 1.0 / (self.num_peers - 1) if reduction == "mean" else 1.0
        return rho * (grid * self.off_diagonal).sum(1)


def _kl_rows(log_q: torch.Tensor, log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis of q (log q − log p) on `mask` (masked entries have q = 0)."""
    q = log_q.exp()
    return torch.where(mask, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)


@register("mcl")
class MCL(_Contrastive):
    """VCL, ICL, soft VCL and soft ICL for every network a and partner b != a (METHODS §1.7).

    S[a, b] = V_a V_bᵀ / tau. Diagonal blocks give VCL, off-diagonal ones ICL; the soft forms distil the
    row distributions softmax(S/T) (self-similarity masked) toward the partner's detached rows.
    """

    def forward(self, out, batch, teach=None):
        with torch.autocast(out.embeddings.device.type, enabled=False):  # distillation math in fp32
            return self._loss(out.embeddings.float(), batch["target"])

    def _loss(self, v: torch.Tensor, y: torch.Tensor) -> dict:
        cfg = self.cfg
        if cfg.global_batch:
            v, y = gather_batch(v, dim=1), gather_batch(y)
        n = v.shape[1]
        sim = torch.einsum("pbd,qcd->pqbc", v, v) / cfg.tau  # [P, P, B, B]
        pos, den = MF.contrast_masks(y)
        hard = MF.supcon_from_logits(sim, pos, den)  # [P, P]: VCL_a on the diagonal, ICL_{a,b} off it
        if cfg.icl_self_positive:  # cross-network blocks only: VCL never counts a sample as its own positive
            pos_x, den_x = MF.contrast_masks(y, self_positive=True)
            hard = torch.where(self.off_diagonal, MF.supcon_from_logits(sim, pos_x, den_x), hard)
        vcl = hard.diagonal()
        # Soft forms: masked row distributions r[a, b, u] = softmax_k(S[a, b, u, k] / T), k != u
        keep = ~torch.eye(n, dtype=torch.bool, device=v.device)
        log_r = torch.log_softmax((sim / cfg.T).masked_fill(~keep, float("-inf")), dim=-1)
        self_blocks = log_r.diagonal(dim1=0, dim2=1).movedim(-1, 0)  # [P, B, B]: network a on itself
        # soft VCL_{a<-b}: KL(sg q_b || q_a), q_a the rows of network a's own block
        soft_vcl = _kl_rows(self_blocks.detach()[None], self_blocks[:, None], keep).sum(-1) / n
        # soft ICL_{a<-b}: KL(sg r[b, a] || r[a, b])
        soft_icl = _kl_rows(log_r.transpose(0, 1).detach(), log_r, keep).sum(-1) / n
        if cfg.soft_t2:
            soft_vcl, soft_icl = soft_vcl * cfg.T**2, soft_icl * cfg.T**2
        pairs = cfg.icl * hard + cfg.soft_vcl * soft_vcl + cfg.soft_icl * soft_icl
        per_peer = cfg.vcl * vcl + self.pair_sum(pairs, cfg.pair_reduction)
        rho = self.pair_sum
        return {
            "loss": per_peer.sum(),
            "per_peer": per_peer,
            "vcl": vcl.sum(),
            "icl": rho(hard, cfg.pair_reduction).sum(),
            "soft_vcl": rho(soft_vcl, cfg.pair_reduction).sum(),
            "soft_icl": rho(soft_icl, cfg.pair_reduction).sum(),
        }


ROWS_BUDGET = 1 << 24  # gathered bank-row elements alive at once (64 MB in fp32)


def _chunks(rows: torch.Tensor, d: int) -> list[slice]:
    """Batch slices whose gathered rows ([b, K+1, d]) stay within ROWS_BUDGET elements."""
    step = max(1, ROWS_BUDGET // (rows.shape[1] * d))
    return [slice(b, b + step) for b in range(0, rows.shape[0], step)]


class _BankScores(torch.autograd.Function):
    """s[i, j, b, k] = exp(<banks[i, rows[b, k]], v[j, b]> / tau), gathered one bank and batch chunk at a time.

    All P banks' rows at once would be [P, B, K+1, d] (2.1 GB at P 4, B 64, K 16384, d 128) and autograd would
    keep them for backward. Here at most ROWS_BUDGET elements are gathered at a time and backward gathers them
    again. The banks must not change between forward and backward (MCLOKD defers its update).
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


@register("mcl_okd")
class MCLOKD(_Contrastive):
    """Memory-bank NCE between peers: peer j's embedding scored against peer i's bank, i != j.

    One bank per peer ([P, N, d], non-trainable state of this term). Negatives are K dataset indices of
    other classes, drawn on device from a class-sorted permutation. Scores use the pre-update rows; the
    momentum update of the positives' rows runs after backward, from every rank's (index, embedding)
    pairs, so data-parallel replicas of the banks stay identical.
    """

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
        self.rng = TermRNG(ctx.seed * 7919 + ctx.rank)
        self._pending_update: tuple[torch.Tensor, torch.Tensor] | None = None

    def sample_negatives(self, y: torch.Tensor) -> torch.Tensor:
        """[B, K] indices drawn uniformly from the classes other than each anchor's own."""
        outside = (self.by_class.numel() - self.counts[y]).unsqueeze(1)  # N - n_y
        u = torch.rand(y.shape[0], self.cfg.K, generator=self.rng(y.device), device=y.device)
        r = (u * outside).long().clamp_max(outside - 1)
        start = self.starts[y].unsqueeze(1)
        r = r + (r >= start) * self.counts[y].unsqueeze(1)  # skip the anchor's class block
        return self.by_class[r]

    def forward(self, out, batch, teach=None):
        self.after_backward()  # a caller that never ran the hook still gets the previous step's update
        cfg = self.cfg
        v = out.embeddings.float()
        idx = batch["index"]
        rows = torch.cat([idx.unsqueeze(1), self.sample_negatives(batch["target"])], dim=1)  # [B, K+1]
        scores = _BankScores.apply(v, self.banks, rows, cfg.tau)  # [P_bank, P_emb, B, K+1]
        mean = mean_over_ranks(scores.detach().mean(dim=(-2, -1))) if cfg.nce_global_norm else None
        nce = MF.nce_loss(scores, self.banks.shape[1], eps=cfg.eps, mean_score=mean) * self.off_diagonal
        per_peer = nce.sum(0)  # attributed to the peer whose embedding is scored
        if cfg.pair_reduction == "mean":  # mean over the P(P-1) ordered pairs
            per_peer = per_peer / (self.num_peers * (self.num_peers - 1))
        self._pending_update = (idx, v.detach())
        return {"loss": per_peer.sum(), "per_peer": per_peer}

    @torch.no_grad()
    def after_backward(self) -> None:
        """Momentum update of the positives' rows with every rank's (index, embedding) pairs."""
        if self._pending_update is None:
            return
        idx, v = (gather_batch(t, dim) for t, dim in zip(self._pending_update, (0, 1)))
        self._pending_update = None
        mixed = self.banks[:, idx] * self.cfg.momentum + v * (1 - self.cfg.momentum)
        self.banks[:, idx] = F.normalize(mixed, dim=-1)

    def get_extra_state(self):
        return self.rng.state()

    def set_extra_state(self, state):
        self.rng.load(state)
