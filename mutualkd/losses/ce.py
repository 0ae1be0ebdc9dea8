"""Cross-entropy of every peer: mean over the batch, summed over peers.

    objective:
      terms:
        - {name: ce, label_smoothing: 0.1}
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from mutualkd.config import TermConfig
from mutualkd.losses.base import Term
from mutualkd.registry import register_term


class CEConfig(TermConfig):
    """Cross-entropy of every peer, summed over peers, mean over the batch."""

    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@register_term("ce", CEConfig)
class CE(Term):
    """CE of every peer (mean over the batch), summed over peers."""

    peer_parallel = True

    def forward(self, out, batch, teach=None):
        z = out.logits.float()
        y = batch["target"]
        ce = F.cross_entropy(
            z.flatten(0, 1), y.repeat(z.shape[0]), reduction="none", label_smoothing=self.cfg.label_smoothing
        )
        per_peer = ce.view(z.shape[0], -1).mean(1)
        return {"loss": per_peer.sum(), "per_peer": per_peer}
