"""LW-KD, knowledge distillation with a lightweight teacher (METHODS.md §2.10, reconstructed). The lightweight
teacher never sees the batch: a sample of class y gets t = softmax(T_lw(x̃_y)/τ), x̃_y a random image of class y
from the teacher's own (synthesised, `composed_digits`) training set, redrawn every step by the term's seeded
generator; plus an adversarial loss through a discriminator on C-dim probabilities (`discriminator.py`).

    teachers: [{run: runs/lwkd_teacher}]
    objective:
      terms:
        - {name: ce, weight: 0.1}
        - {name: lwkd, weight: 0.9, T: 4.0, adversarial_weight: 0.1}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.base import TermRNG, UpdatePhase
from mutualkd.losses.discriminator import Discriminator, DiscriminatorConfig, discriminator_optimizer
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig
from mutualkd.registry import register_term


class LWKDConfig(TeacherTermConfig):
    """LW-KD (METHODS §2.10, reconstructed): targets t = softmax(T_lw(x̃_y)/τ) from a lightweight teacher trained
    on a synthetic dataset with the same classes; weight = α on τ²·KL(t ‖ p_S), plus
    adversarial_weight·BCE(D(p_S), real)."""

    name: Literal["lwkd"] = "lwkd"
    weight: float = Field(0.9, ge=0.0)  # α; give the ce term (1 − α) = 0.1
    T: float = Field(4.0, gt=0.0)  # τ
    adversarial_weight: float = Field(0.1, ge=0.0)
    hidden: int = Field(256, ge=1)  # discriminator MLP width
    discriminator: DiscriminatorConfig = DiscriminatorConfig()


@register_term("lwkd", LWKDConfig)
class LWKD(TeacherTerm):
    """LW-KD (METHODS §2.10, reconstructed). The lightweight teacher never sees the batch: a sample of class y
    gets t = softmax(T_lw(x̃_y)/τ), x̃_y a random image of class y from the teacher's own (synthesised) training
    set, redrawn every step by the term's seeded generator. Per peer and teacher the loss is
    τ²·KL(t ‖ softmax(z/τ)) (batchmean) + (adversarial_weight/α)·BCE(D(softmax(z/τ)), real), so that with
    weight = α the objective adds α·τ²·KL + λ_adv·BCE; D is an MLP on C-dim probabilities, real = t,
    fake = sg(softmax(z/τ)). Logged: `kl` and `adversarial` (unweighted, summed over peers), `discriminator`."""

    peer_parallel = True  # reads only logits

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        if cfg.weight == 0:
            raise UserError(f"{key}.weight: lwkd's weight is α and must be > 0 (the adversarial part is scaled by "
                            "adversarial_weight/α); leave the term out instead")
        self.require_classes(ctx.num_classes, "LW-KD needs the same classes C on both sides (METHODS.md §2.10)")
        for t in sorted({t for _, t in self.pairs}):
            teacher = self.teacher(t)
            if teacher.data_cfg is None:
                raise UserError(f"{key} (lwkd): {teacher.name} must be a mutualkd run directory (teachers.{t}.run): "
                                "LW-KD draws its inputs from the dataset the teacher was trained on")
        self.discriminators = nn.ModuleDict({
            self.pair_key(p, t): Discriminator.for_probabilities(ctx.num_classes, cfg.hidden)
            for p, t in self.pairs
        })
        self.rng = TermRNG(ctx.seed * 1_000_003 + 0x4C574B44 + ctx.rank)  # data ranks draw for their own shards

    def teacher_logits(self, t: int, y: torch.Tensor) -> torch.Tensor:
        """[B, C] logits of teacher t on a fresh random image of each label in y (from its training set)."""
        return self.teacher(t).from_labels(y, self.rng(y.device)).float()

    def targets(self, out, batch, teach) -> dict[int, torch.Tensor]:
        """Teacher index -> its [B, C] logits on fresh label-drawn images, drawn once per forward (the
        discriminators' phase and the loss share them)."""
        ids = sorted({t for p in range(self.num_peers) for t in self.active(teach, p)})
        return out.memo((self.key, "targets"), lambda: {t: self.teacher_logits(t, batch["target"]) for t in ids})

    def update_phases(self):
        opt = discriminator_optimizer(self.discriminators.parameters(), self.cfg.discriminator)
        return [UpdatePhase("discriminator", opt, self.discriminator_loss)]

    def discriminator_loss(self, out, batch, teach):
        """Every discriminator's BCE (real = the teacher's softened targets, fake = the peer's, detached)."""
        T, z, lw = self.cfg.T, out.logits.float(), self.targets(out, batch, teach)
        losses = torch.stack([self.discriminators[self.pair_key(p, t)].loss(torch.softmax(lw[t] / T, dim=-1),
                                                                          torch.softmax(z[p] / T, dim=-1))
                              for p in range(self.num_peers) for t in self.active(teach, p)])
        return {"loss": losses.sum(), "discriminator": losses.detach().mean()}

    def forward(self, out, batch, teach=None):
        cfg, z, lw = self.cfg, out.logits.float(), self.targets(out, batch, teach)
        kl, adversarial = [], []
        for p in range(self.num_peers):
            ts = self.active(teach, p)
            fake = torch.softmax(z[p] / cfg.T, dim=-1)
            kl.append(torch.stack([MF.kd_kl(z[p], lw[t], cfg.T) for t in ts]).mean())
            adversarial.append(torch.stack([self.discriminators[self.pair_key(p, t)].fool(fake) for t in ts]).mean())
        kl, adversarial = torch.stack(kl), torch.stack(adversarial)
        per_peer = kl + (cfg.adversarial_weight / cfg.weight) * adversarial
        return {"loss": per_peer.sum(), "per_peer": per_peer, "kl": kl.sum(), "adversarial": adversarial.sum()}

    def get_extra_state(self):
        return self.rng.state()

    def set_extra_state(self, state):
        self.rng.load(state)
