"""A plugin term, written outside mutualkd: logit matching between peers (Ba & Caruana, 2014, "Do Deep Nets
Really Need to be Deep?", used as an online term): each peer regresses its logits onto the detached mean logits
of the group (or of the other peers), mean squared error over classes and batch, summed over peers.

    mutualkd train --plugin examples/logit_mse.py examples/logit_mse.yaml

    objective:
      terms:
        - {name: ce}
        - {name: logit_mse, weight: 0.5, leave_one_out: true}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mutualkd import Term, TermConfig, register_term


class LogitMSEConfig(TermConfig):
    """Its config fields are validated like a built-in's: unknown keys and bad values stop the run (exit 2)."""

    name: Literal["logit_mse"] = "logit_mse"
    weight: float = Field(0.5, ge=0.0)
    leave_one_out: bool = False  # the target of peer p: the mean of the others, not of the whole group


@register_term("logit_mse", LogitMSEConfig)
class LogitMSE(Term):
    peer_parallel = True  # reads only logits, which placement=peer_parallel exchanges
    min_peers = 2

    def forward(self, out, batch, teach=None):
        z = out.logits.float()  # [P, B, C]
        total = z.detach().sum(0, keepdim=True)
        if self.cfg.leave_one_out:
            target = (total - z.detach()) / (z.shape[0] - 1)
        else:
            target = total / z.shape[0]
        per_peer = (z - target).pow(2).mean(dim=(1, 2))
        return {"loss": per_peer.sum(), "per_peer": per_peer}
