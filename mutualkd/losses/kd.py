"""Hinton KD from offline teachers (METHODS.md §2.1): T²·batchmean KL toward the teachers' detached logits,
forward or reverse (METHODS §3), with the multi-teacher policy. RepDistiller's recipe is 0.1 CE + 0.9 KD at T 4.

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: ce, weight: 0.1}
        - {name: kd, weight: 0.9, T: 4.0, direction: forward, average: logits}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig
from mutualkd.registry import register_term


class KDConfig(TeacherTermConfig):
    """Hinton KD (METHODS §2.1): T²·batchmean KL(softmax(sg(t)/T) ‖ softmax(z/T)); RepDistiller: CE 0.1 + KD 0.9."""

    name: Literal["kd"] = "kd"
    weight: float = Field(0.9, ge=0.0)
    T: float = Field(4.0, gt=0.0)
    direction: Literal["forward", "reverse"] = "forward"  # reverse: KL(p_S ‖ p_T) (METHODS §3)
    average: Literal["logits", "loss"] = "logits"  # several teachers: KD to the mean logits, or mean of KD terms


@register_term("kd", KDConfig)
class KD(TeacherTerm):
    """T²·batchmean KL toward the teachers' detached logits; several teachers: KD to their mean logits
    (`average: logits`, METHODS §3.4 `mean_logits`) or the mean of per-teacher KD terms (`average: loss`)."""

    peer_parallel = True

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.teacher_taps = {"logits"}
        self.require_classes(ctx.num_classes, "KD needs the same classes C on both sides (METHODS.md §2.11)")

    def forward(self, out, batch, teach=None):
        z, T, d = out.logits.float(), self.cfg.T, self.cfg.direction
        sets = [tuple(self.active(teach, p)) for p in range(self.num_peers)]
        if self.cfg.average == "loss":
            per_peer = torch.stack([
                torch.stack([MF.kd_kl(z[p], teach.logits[t], T, d) for t in ts]).mean() for p, ts in enumerate(sets)
            ])
        elif len(set(sets)) == 1:  # every peer has the same teachers (average, round robin): one shared target
            target = torch.stack([teach.logits[t].float() for t in sets[0]]).mean(0)
            per_peer = MF.kd_per_peer(z, target, T, d)
        else:
            targets = torch.stack([torch.stack([teach.logits[t].float() for t in ts]).mean(0) for ts in sets])
            per_peer = MF.kd_per_peer(z, targets, T, d)
        return {"loss": per_peer.sum(), "per_peer": per_peer}
