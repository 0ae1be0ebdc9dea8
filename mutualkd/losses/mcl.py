"""MCL, mutual contrastive learning (METHODS.md §1.7): VCL, ICL, soft VCL and soft ICL for every network a and
partner b != a, all ordered pairs at once on the P×P grid of B×B similarity blocks of the stacked embeddings
V [P, B, d]. Under data parallelism the contrast spans the all-gathered global batch (`global_batch`).

    embedding: {head: mlp, dim: 128}
    data: {sampler: m_per_class, m_per_class: 2}
    objective:
      terms:
        - {name: ce}
        - {name: mcl, tau: 0.1, T: 3.0, vcl: 0.1, icl: 0.1, soft_vcl: 1.0, soft_icl: 1.0}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mutualkd.config import TermConfig
from mutualkd.losses import functional as MF
from mutualkd.losses.base import Term, pair_sum
from mutualkd.registry import register_term


class MCLConfig(TermConfig):
    """MCL in-batch contrast (METHODS §1.7): VCL, ICL and their soft forms, over all ordered pairs."""

    name: Literal["mcl"] = "mcl"
    tau: float = Field(0.1, gt=0.0)
    T: float = Field(3.0, gt=0.0)  # soft-form temperature
    vcl: float = Field(0.1, ge=0.0)  # alpha
    icl: float = Field(0.1, ge=0.0)  # beta
    soft_vcl: float = Field(1.0, ge=0.0)  # gamma
    soft_icl: float = Field(1.0, ge=0.0)  # lambda
    pair_reduction: Literal["mean", "sum"] = "mean"  # rho = 1/(P-1) (Gap for P > 2) or 1
    icl_self_positive: bool = False
    soft_t2: bool = True  # the T^2 factor on the soft terms [reconstructed]
    global_batch: bool = True  # data-parallel: contrast over the all-gathered global batch


def _kl_rows(log_q: torch.Tensor, log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis of q (log q − log p) on `mask` (masked entries have q = 0)."""
    q = log_q.exp()
    return torch.where(mask, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)


@register_term("mcl", MCLConfig)
class MCL(Term):
    """VCL, ICL, soft VCL and soft ICL for every network a and partner b != a (METHODS §1.7).

    S[a, b] = V_a V_bᵀ / tau. Diagonal blocks give VCL, off-diagonal ones ICL; the soft forms distil the
    row distributions softmax(S/T) (self-similarity masked) toward the partner's detached rows.
    """

    needs_embeddings = True
    peer_parallel = True
    min_peers = 2

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.register_buffer("off_diagonal", ~torch.eye(self.num_peers, dtype=torch.bool), persistent=False)

    def forward(self, out, batch, teach=None):
        with torch.autocast(out.embeddings.device.type, enabled=False):  # distillation math in fp32
            return self._loss(out.embeddings.float(), batch["target"])

    def _loss(self, v: torch.Tensor, y: torch.Tensor) -> dict:
        cfg = self.cfg
        if cfg.global_batch:
            v, y = self.placement.gather_batch(v, dim=1), self.placement.gather_batch(y)
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
        rho = cfg.pair_reduction
        pairs = cfg.icl * hard + cfg.soft_vcl * soft_vcl + cfg.soft_icl * soft_icl
        per_peer = cfg.vcl * vcl + pair_sum(pairs, rho)
        return {
            "loss": per_peer.sum(),
            "per_peer": per_peer,
            "vcl": vcl.sum(),
            "icl": pair_sum(hard, rho).sum(),
            "soft_vcl": pair_sum(soft_vcl, rho).sum(),
            "soft_icl": pair_sum(soft_icl, rho).sum(),
        }
