"""Objective = weighted terms with ramp schedules, in stages. Knows nothing about any one method.

It builds each configured term from the registry, sums the active stage's terms (weight × ramp × loss), and
gathers what the trainer needs from the terms through the term API (`mutualkd.losses.base`): the peer and
teacher taps they read, their own update phases (discriminators), how the peers' update splits within a step
(DML's alternating updates) and their after-step hooks (memory banks).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mutualkd.config import ObjectiveConfig, Ramp
from mutualkd.errors import UserError
from mutualkd.losses.base import BuildContext, UpdatePhase
from mutualkd.registry import TERMS


def ramp_factor(ramp: Ramp, epoch: float) -> float:
    """Weight multiplier at fractional epoch `epoch`: linear t/L or ONE's exp(-5(1 - t/L)^2)."""
    if ramp.shape == "constant" or ramp.epochs == 0:
        return 1.0
    t = min(epoch / ramp.epochs, 1.0)
    return t if ramp.shape == "linear" else math.exp(-5.0 * (1.0 - t) ** 2)


class Objective(nn.Module):
    """The weighted sum of the active stage's terms; returns the total and every part for logging."""

    def __init__(self, cfg: ObjectiveConfig, ctx: BuildContext):
        super().__init__()
        self.labels = cfg.labels
        self.terms = nn.ModuleList(TERMS.get(t.name).term(t, ctx, f"objective.terms.{i}")
                                   for i, t in enumerate(cfg.terms))
        self.peer_names = ctx.peer_names
        self.stages = [(s.epochs, set(s.terms)) for s in cfg.stages] or [(math.inf, set(self.labels))]
        self.student_taps = sorted(set().union(*(t.student_taps for t in self.terms)))
        self.teachers = [ctx.teachers] if ctx.teachers is not None else []  # a list: not a submodule (never saved)
        # (term label, phase): the terms' own optimizer updates, built once (their optimizers hold the parameters)
        self.phases: list[tuple[str, UpdatePhase]] = [(label, phase) for label, term in zip(self.labels, self.terms)
                                                      for phase in term.update_phases()]
        splits = [(label, term.peer_updates()) for label, term in zip(self.labels, self.terms)]
        splits = [(label, groups) for label, groups in splits if groups is not None]
        if len(splits) > 1:
            raise UserError(f"objective.terms: {splits[0][0]} and {splits[1][0]} both set how the peers' update "
                            "splits within a step; only one term can")
        self._peer_updates = splits[0] if splits else None

    def stage(self, epoch: float) -> tuple[float, set[str]]:
        """(start epoch, active term labels) of the stage that fractional epoch `epoch` falls in."""
        start = 0.0
        for length, active in self.stages:
            if epoch < start + length:
                return start, active
            start += length
        return start - self.stages[-1][0], self.stages[-1][1]

    def teach(self, x: torch.Tensor, step: int, epoch: float):
        """Run the teachers this step's active terms need on the students' batch (None without teachers)."""
        if not self.teachers:
            return None
        teachers = self.teachers[0]
        assignment = teachers.assignment(step)
        _, active = self.stage(epoch)
        wants: dict[int, set[str]] = {}
        for label, term in zip(self.labels, self.terms):
            if label in active:
                for t, taps in term.teacher_wants(assignment).items():
                    wants.setdefault(t, set()).update(taps)
        return teachers(x, step, wants)

    def peer_updates(self, epoch: float) -> list[list[int] | None]:
        """The peer groups stepped in turn at this epoch: [None] (every peer at once) unless an active term
        splits the update (DML alternating: [[0], [1], ...])."""
        if self._peer_updates is None or self._peer_updates[0] not in self.stage(epoch)[1]:
            return [None]
        return self._peer_updates[1]

    def active_phases(self, epoch: float) -> list[tuple[str, UpdatePhase]]:
        """The update phases of the terms active at this epoch, in term order."""
        _, active = self.stage(epoch)
        return [(label, phase) for label, phase in self.phases if label in active]

    def forward(self, out, batch: dict, epoch: float, teach=None) -> dict[str, torch.Tensor]:
        start, active = self.stage(epoch)
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for label, term in zip(self.labels, self.terms):
            if label not in active:
                continue
            parts = term(out, batch, teach)
            weight = term.cfg.weight * ramp_factor(term.cfg.ramp, epoch - start)
            total = total + weight * parts["loss"]
            logs[f"loss/{label}"] = parts.pop("loss").detach()
            per_peer = parts.pop("per_peer", None)
            if per_peer is not None:
                logs.update({f"{label}/{n}": v for n, v in zip(self.peer_names, per_peer.detach().unbind(0))})
            logs.update({f"{label}/{k}": v.detach() for k, v in parts.items()})
        logs["loss"] = total.detach()
        return {"loss": total, "logs": logs}

    def main_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that join the peers' optimizer (adapters, regressors, embeddings): all but those
        of the terms' own update phases."""
        own = {id(p) for _, phase in self.phases for p in phase.parameters}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def after_step(self) -> None:
        """Every term's after-step update (memory banks), once per optimizer step."""
        for term in self.terms:
            term.after_step()
