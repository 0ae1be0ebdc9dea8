"""Objective = weighted terms with ramp schedules, in stages. Knows nothing about any one method.

A term is an `nn.Module` registered under its config name. It reads what it needs from the
`GroupOutput`, the batch and the `TeacherOutput` and returns a dict: `loss` (a scalar, before the term's
weight), optionally `per_peer` ([P]) and any named parts for logging. Terms own their state (memory banks,
samplers) and their trainable extras (adapters join the peers' optimizer; discriminators get their own
optimizer, which the term steps itself, see `Term.own_optimizer_parameters`). A term declares the peer taps
(`student_taps`) and teacher taps (`teacher_taps`) it reads, so a step computes only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mutualkd.config import ObjectiveConfig, Ramp

TERMS: dict[str, type[Term]] = {}


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
    tap_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)  # per local peer, from the dry run
    teachers: Any = None  # TeacherSet, or None without teachers
    input_shape: tuple[int, ...] = ()  # (C, H, W) of the peers' input (decoders back to the image)


class Term(nn.Module):
    name = "term"
    student_taps: frozenset[str] = frozenset()  # peer taps this term reads from GroupOutput.taps

    def __init__(self, cfg, ctx: BuildContext, key: str):
        super().__init__()
        self.cfg = cfg
        self.num_peers = len(ctx.peer_names)
        self.key = key  # config key (objective.terms.i) for error messages

    def forward(self, out, batch: dict, teach=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def teacher_wants(self, assignment: list[list[int]]) -> dict[int, set[str]]:
        """Teacher index -> taps this term needs from a teacher forward at a step with this assignment."""
        return {}

    def own_optimizer_parameters(self) -> list[nn.Parameter]:
        """Parameters the term steps with its own optimizer (discriminators); kept out of the peers' optimizer."""
        return []


class TermRNG:
    """A term's own random stream (negative sampling, LW-KD's draws): seeded from the config, created on the
    device of its first use, checkpointed through the term's extra state so a resumed run draws the same."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None  # a restored state, applied when the generator is created

    def __call__(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)
            if self._pending is not None:
                self.generator.set_state(self._pending)
                self._pending = None
        return self.generator

    def state(self) -> dict:
        state = self.generator.get_state() if self.generator is not None else self._pending
        return {"generator": state} if state is not None else {}

    def load(self, state: dict) -> None:
        self.generator, self._pending = None, state.get("generator")


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
        from mutualkd.losses import adain, adversarial, contrastive, hint, kd, logit, relation  # noqa: F401, I001

        self.labels = cfg.labels
        self.terms = nn.ModuleList(TERMS[t.name](t, ctx, f"objective.terms.{i}") for i, t in enumerate(cfg.terms))
        self.peer_names = ctx.peer_names
        self.stages = [(s.epochs, set(s.terms)) for s in cfg.stages] or [(math.inf, set(self.labels))]
        self.student_taps = sorted(set().union(*(t.student_taps for t in self.terms)))
        self.teachers = [ctx.teachers] if ctx.teachers is not None else []  # a list: not a submodule (never saved)

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
        """Trainable parameters that join the peers' optimizer (adapters, regressors, embeddings)."""
        own = {id(p) for term in self.terms for p in term.own_optimizer_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in own]

    def after_backward(self) -> None:
        """State updates that must wait until gradients are computed (memory banks); call after backward."""
        for term in self.terms:
            hook = getattr(term, "after_backward", None)
            if hook is not None:
                hook()
