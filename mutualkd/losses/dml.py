"""DML, deep mutual learning (METHODS.md §1.1): each peer's KL toward every other peer, rows of the pairwise KL
matrix in one einsum, summed over peers.

`update_mode: synchronous` (default) updates every peer from one forward. `alternating` is the paper's
Algorithm 1: per batch, for each peer k in turn, all peers predict with their current weights and peer k alone
takes a step, so every later peer learns from its predecessors' updated predictions (P forwards per batch).

    objective:
      terms:
        - {name: ce}
        - {name: dml, T: 1.0, reduction: mean, update_mode: alternating}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mutualkd.config import TermConfig
from mutualkd.losses import functional as MF
from mutualkd.losses.base import Term
from mutualkd.registry import register_term


class DMLConfig(TermConfig):
    """DML: each peer's KL toward every other peer (METHODS §1.1); summed over peers."""

    name: Literal["dml"] = "dml"
    T: float = Field(1.0, gt=0.0)
    reduction: Literal["mean", "sum"] = "mean"  # rho = 1/(P-1) ("mean", reconstructed) or 1 (official)
    update_mode: Literal["synchronous", "alternating"] = "synchronous"  # alternating: the paper's Algorithm 1

    @property
    def updates_peers_in_turn(self) -> bool:
        return self.update_mode == "alternating"

    def check(self, cfg, key: str) -> None:
        if self.update_mode != "alternating":
            return
        why = None
        if cfg.topology.kind != "independent":
            why = ("a shared stem belongs to every peer, so it cannot be stepped one peer at a time; use "
                   "topology.kind=independent")
        elif cfg.placement == "peer_parallel":
            why = ("peers step one at a time, so peer_parallel's processes would wait on each other; use "
                   "placement=data_parallel")
        elif cfg.train.grad_accum > 1:
            why = "each peer's step follows its own forward of the batch; use train.grad_accum=1"
        elif sum(isinstance(t, DMLConfig) and t.update_mode == "alternating" for t in cfg.objective.terms) > 1:
            why = "only one term can set the peers' update order"
        if why:
            raise ValueError(f"{key}.update_mode: alternating: {why}")


@register_term("dml", DMLConfig)
class DML(Term):
    """Each peer's KL toward every other peer (rows of the pairwise KL matrix), summed over peers."""

    peer_parallel = True
    min_peers = 2

    def forward(self, out, batch, teach=None):
        per_peer = MF.dml_loss(out.logits, T=self.cfg.T, reduction=self.cfg.reduction)
        return {"loss": per_peer.sum(), "per_peer": per_peer}

    def peer_updates(self) -> list[list[int]] | None:
        return [[p] for p in range(self.num_peers)] if self.cfg.update_mode == "alternating" else None
