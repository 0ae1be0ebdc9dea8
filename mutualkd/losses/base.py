"""The term API: what a method module implements and what the engine gives it.

A term is an `nn.Module` registered under its config name (`mutualkd.registry.register_term`). Its `forward`
reads what it needs from the `GroupOutput`, the batch dict and the `TeacherOutput` and returns a dict: `loss`
(a scalar, before the term's weight), optionally `per_peer` ([P]) and any named parts for logging. A term owns
its state (memory banks, samplers) and its trainable extras: adapters join the peers' optimizer; anything with
its own optimizer (discriminators) is declared as an `UpdatePhase`, which the trainer runs. The class
attributes below say what the term needs; the config validation and the trainer read them from the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mutualkd.errors import UserError
from mutualkd.placement import Placement


@dataclass
class BuildContext:
    """What terms may need to know when they are built."""

    peer_names: list[str]
    num_classes: int
    train_targets: torch.Tensor  # [N] labels of the training set (memory banks, negative sampling)
    embedding_dim: int | None  # None when the group has no projection heads
    seed: int
    placement: Placement = field(default_factory=Placement)
    tap_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)  # per local peer, from the dry run
    teachers: Any = None  # TeacherSet, or None without teachers
    input_shape: tuple[int, ...] = ()  # (C, H, W) of the peers' input (decoders back to the image)

    @property
    def rank(self) -> int:
        """This process's data rank (seeds a term's own random stream)."""
        return self.placement.data_world()[0]


@dataclass
class UpdatePhase:
    """An optimizer update a term owns (a discriminator's step), run by the trainer after each forward and
    before the peers' losses. `loss(out, batch, teach)` returns {"loss": scalar, ...parts to log}; the
    trainer differentiates it with respect to the optimizer's parameters only (so nothing else is touched),
    averages those gradients over data-parallel ranks, steps the optimizer and checkpoints its state."""

    name: str  # logged as <term label>/<name>
    optimizer: torch.optim.Optimizer
    loss: Callable[..., dict[str, torch.Tensor]]

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


class Term(nn.Module):
    """Base of every objective term (see the module docstring)."""

    name = "term"  # set by register_term
    needs_teacher: bool = False  # reads frozen offline teachers
    needs_embeddings: bool = False  # reads the projection heads' embeddings (embedding.head != none)
    peer_parallel: bool = False  # reads only logits and embeddings, which placement=peer_parallel exchanges
    min_peers: int = 1
    student_taps: frozenset[str] = frozenset()  # peer taps this term reads from GroupOutput.taps

    def __init__(self, cfg, ctx: BuildContext, key: str):
        super().__init__()
        self.cfg = cfg
        self.num_peers = len(ctx.peer_names)
        self.key = key  # config key (objective.terms.i) for error messages
        self.placement = ctx.placement
        if self.needs_embeddings and ctx.embedding_dim is None:
            raise UserError(f"{key} ({cfg.name}): needs peer embeddings; set embedding.head to linear or mlp")
        if self.num_peers < self.min_peers:
            raise UserError(f"{key} ({cfg.name}): needs at least {self.min_peers} peers, the config has "
                            f"{self.num_peers}")

    def forward(self, out, batch: dict, teach=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def teacher_wants(self, assignment: list[list[int]]) -> dict[int, set[str]]:
        """Teacher index -> taps this term needs from a teacher forward at a step with this assignment."""
        return {}

    def update_phases(self) -> list[UpdatePhase]:
        """The term's own optimizer updates (called once, after the term is on its device)."""
        return []

    def peer_updates(self) -> list[list[int]] | None:
        """How the peers' update splits within a step: None for one synchronous update of every peer; else
        groups of peer indices, stepped in turn, each after a fresh forward (DML's alternating updates)."""
        return None

    def after_step(self) -> None:
        """State updates after each optimizer step (memory banks), from what the step's forwards computed."""


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


def pair_sum(grid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-anchor-peer sum of a [P, P] grid over partners b != a, times rho (1/(P-1) for "mean", 1 for "sum")."""
    n = grid.shape[0]
    rho = 1.0 / (n - 1) if reduction == "mean" else 1.0
    off = ~torch.eye(n, dtype=torch.bool, device=grid.device)
    return rho * (grid * off).sum(1)
