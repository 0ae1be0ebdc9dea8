"""Ensemble distillation, MCL-OKD's DOT (METHODS.md §1.6): KD from the detached mean-logit ensemble (which
includes the student) to the last peer (`targets: last`, official) or to every peer.

    objective:
      terms:
        - {name: ce}
        - {name: dot, T: 3.0, targets: last}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mutualkd.config import TermConfig
from mutualkd.losses import functional as MF
from mutualkd.losses.base import Term
from mutualkd.registry import register_term


class DOTConfig(TermConfig):
    """Ensemble distillation (MCL-OKD's DOT, METHODS §1.6): KD from the detached mean logits."""

    name: Literal["dot"] = "dot"
    T: float = Field(3.0, gt=0.0)
    targets: Literal["last", "all"] = "last"  # which peers are distilled


@register_term("dot", DOTConfig)
class DOT(Term):
    """KD from the detached mean-logit ensemble (which includes the student) to the last or every peer."""

    peer_parallel = True
    min_peers = 2

    def forward(self, out, batch, teach=None):
        per_peer = MF.ensemble_kd(out.logits, T=self.cfg.T)
        if self.cfg.targets == "last":  # only the last peer is distilled; log zeros for the others
            per_peer = per_peer * (torch.arange(len(per_peer), device=per_peer.device) == len(per_peer) - 1)
        return {"loss": per_peer.sum(), "per_peer": per_peer}
