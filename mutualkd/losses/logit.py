"""Logit terms: cross-entropy, DML (METHODS §1.1) and ensemble distillation / DOT (§1.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.objective import Term, register


@register("ce")
class CrossEntropy(Term):
    """CE of every peer (mean over the batch), summed over peers."""

    def forward(self, out, batch, teach=None):
        z = out.logits.float()
        y = batch["target"]
        ce = F.cross_entropy(
            z.flatten(0, 1), y.repeat(z.shape[0]), reduction="none", label_smoothing=self.cfg.label_smoothing
        )
        per_peer = ce.view(z.shape[0], -1).mean(1)
        return {"loss": per_peer.sum(), "per_peer": per_peer}


class _NeedsPeers(Term):
    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        if self.num_peers < 2:
            raise UserError(f"{key} ({cfg.name}): needs at least 2 peers, the config has {self.num_peers}")


@register("dml")
class DML(_NeedsPeers):
    """Each peer's KL toward every other peer (rows of the pairwise KL matrix), summed over peers."""

    def forward(self, out, batch, teach=None):
        per_peer = MF.dml_loss(out.logits, T=self.cfg.T, reduction=self.cfg.reduction)
        return {"loss": per_peer.sum(), "per_peer": per_peer}


@register("dot")
class EnsembleKD(_NeedsPeers):
    """KD from the detached mean-logit ensemble (which includes the student) to the last or every peer."""

    def forward(self, out, batch, teach=None):
        per_peer = MF.ensemble_kd(out.logits, T=self.cfg.T)
        if self.cfg.targets == "last":  # only the last peer is distilled; log zeros for the others
            per_peer = per_peer * (torch.arange(len(per_peer), device=per_peer.device) == len(per_peer) - 1)
        return {"loss": per_peer.sum(), "per_peer": per_peer}
