"""Objective = weighted terms with ramp schedules. Knows nothing about any one method.

A term is an `nn.Module` registered under its config name. It reads what it needs from the
`GroupOutput` and the batch and returns a dict: `loss` (a scalar, before the term's weight), optionally
`per_peer` ([P]) and any named parts for logging. Terms own their state (memory banks, samplers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mutualkd.config import ObjectiveConfig, Ramp

TERMS: dict[str, type["Term"]] = {}


def register(name: str):
    def add(cls):
        cls.name = name
        TERMS[name] = cls
        return cls

    return add


@dataclass
class BuildContext:
    """What terms may need to know when they are built."""

    peer_names: list[str]
    num_classes: int
    train_targets: torch.Tensor  # [N] labels of the training set (memory banks, negative sampling)
    embedding_dim: int | None  # None when the group has no projection heads
    seed: int
    rank: int = 0


class Term(nn.Module):
    name = "term"

    def __init__(self, cfg, ctx: BuildContext, key: str):
        super().__init__()
        self.cfg = cfg
        self.num_peers = len(ctx.peer_names)
        self.key = key  # config key (objective.terms.i) for error messages

    def forward(self, out, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def ramp_factor(ramp: Ramp, epoch: float) -> float:
    """Weight multiplier at fractional epoch `epoch`: linear t/L or ONE's exp(-5(1 - t/L)^2)."""
    if ramp.shape == "constant" or ramp.epochs == 0:
        return 1.0
    t = min(epoch / ramp.epochs, 1.0)
    return t if ramp.shape == "linear" else math.exp(-5.0 * (1.0 - t) ** 2)


class Objective(nn.Module):
    """The weighted sum of the configured terms; returns the total and every part for logging."""

    def __init__(self, cfg: ObjectiveConfig, ctx: BuildContext):
        super().__init__()
        from mutualkd.losses import contrastive, logit  # noqa: F401  (fill the registry)

        names = [t.name for t in cfg.terms]
        self.labels = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
        self.terms = nn.ModuleList(TERMS[t.name](t, ctx, f"objective.terms.{i}") for i, t in enumerate(cfg.terms))
        self.peer_names = ctx.peer_names

    def forward(self, out, batch: dict, epoch: float) -> dict[str, torch.Tensor]:
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for label, term in zip(self.labels, self.terms):
            parts = term(out, batch)
            weight = term.cfg.weight * ramp_factor(term.cfg.ramp, epoch)
            total = total + weight * parts["loss"]
            logs[f"loss/{label}"] = parts.pop("loss").detach()
            per_peer = parts.pop("per_peer", None)
            if per_peer is not None:
                logs.update({f"{label}/{n}": v for n, v in zip(self.peer_names, per_peer.detach().unbind(0))})
            logs.update({f"{label}/{k}": v.detach() for k, v in parts.items()})
        logs["loss"] = total.detach()
        return {"loss": total, "logs": logs}

    def after_backward(self) -> None:
        """State updates that must wait until gradients are computed (memory banks); call after backward."""
        for term in self.terms:
            hook = getattr(term, "after_backward", None)
            if hook is not None:
                hook()
