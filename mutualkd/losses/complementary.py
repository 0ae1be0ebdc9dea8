"""Complementary features from offline teachers (METHODS.md §2.9, reconstructed): per (peer, teacher) an
alignment block A (conv–BN–ReLU to the teacher's map, default the last stage) on the peer's map E_S;
feature_weight·mean(A(E_S) − sg(E_T))² + adversarial_weight·BCE(D(A(E_S)), real), with a discriminator D per
(peer, teacher) trained in its own update phase on real = E_T, fake = sg(A(E_S)) (`discriminator.py`).
`routing: mktn` takes the feature loss from `feature_teacher` (discriminative) and the adversarial loss from
`adversarial_teacher` (generative, trained with the `reconstruction` term), each through its own A.

    teachers: [{run: runs/teacher, name: disc}, {run: runs/recon_teacher, name: gen}]
    objective:
      terms:
        - {name: ce}
        - {name: complementary, routing: mktn, feature_teacher: disc, adversarial_teacher: gen}
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.base import UpdatePhase
from mutualkd.losses.discriminator import Discriminator, DiscriminatorConfig, discriminator_optimizer
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig, conv_regressor, last_stage
from mutualkd.registry import register_term

ALIGN_RULE = ("complementary needs C and H×W equal after the alignment block, which maps C_S -> C_T and changes "
              "H×W only by an integer factor (strided conv if the student map is larger, transposed conv if smaller)")


class ComplementaryConfig(TeacherTermConfig):
    """Complementary features (METHODS §2.9, reconstructed): alignment block A on the last stage;
    feature_weight·mean(A(E_S) − sg(E_T))² + adversarial_weight·BCE(D(A(E_S)), real), D alternating on its own."""

    name: Literal["complementary"] = "complementary"
    weight: float = Field(1.0, ge=0.0)
    feature_weight: float = Field(100.0, ge=0.0)  # λ_f
    adversarial_weight: float = Field(0.1, ge=0.0)  # λ_adv
    tap: str | None = None  # None: the last stage
    teacher_tap: str | None = None
    routing: Literal["single_teacher", "mktn"] = "single_teacher"
    feature_teacher: str | None = None  # mktn: the discriminative teacher (feature loss)
    adversarial_teacher: str | None = None  # mktn: the generative (reconstruction) teacher (adversarial loss)
    discriminator: DiscriminatorConfig = DiscriminatorConfig()

    teacher_fields: ClassVar[tuple[str, ...]] = ("teacher", "feature_teacher", "adversarial_teacher")


@register_term("complementary", ComplementaryConfig)
class Complementary(TeacherTerm):
    """See the module docstring. Logged: `feature` (the MSE) and `adversarial` (the BCE), summed over peers, and
    `discriminator` (the mean of the discriminators' losses, from their update phase)."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        routed = ("feature_teacher", "adversarial_teacher")
        if cfg.routing == "mktn":
            missing = [f for f in routed if getattr(cfg, f) is None]
            if missing:
                raise UserError(f"{key}.{missing[0]}: routing mktn needs feature_teacher (the discriminative teacher) "
                                "and adversarial_teacher (the generative, reconstruction-trained one)")
            if cfg.teacher is not None:
                raise UserError(f"{key}.teacher: routing mktn takes its teachers from feature_teacher and "
                                "adversarial_teacher; remove teacher")
            tf, ta = (self.teacher_set.index(getattr(cfg, f)) for f in routed)
            self.routes = [([tf], [ta])] * self.num_peers  # per peer: (feature teachers, adversarial teachers)
            self.pairs = sorted({(p, t) for p in range(self.num_peers) for t in (tf, ta)})
        else:
            for f in routed:
                if getattr(cfg, f) is not None:
                    raise UserError(f"{key}.{f}: only used with routing mktn; use teacher (or the teacher policy)")
            self.routes = None
        self.tap, self.t_taps = self.resolve_taps("tap", cfg.tap, cfg.teacher_tap, last_stage)
        self.student_taps, self.teacher_taps = {self.tap}, set(self.t_taps.values())
        self.align = nn.ModuleDict()
        self.discriminators = nn.ModuleDict()
        adversarial = {(p, t) for p, (_, ts) in enumerate(self.routes) for t in ts} if self.routes else set(self.pairs)
        for p, t in self.pairs:
            s_shape, t_shape = self.student_shape(p, self.tap), self.teacher_shape(t, self.t_taps[t])
            block = conv_regressor(s_shape, t_shape) if len(s_shape) == 3 and len(t_shape) == 3 else None
            if block is None:
                raise self.shape_error(p, t, self.tap, self.t_taps[t], ALIGN_RULE)
            self.align[self.pair_key(p, t)] = block
            if (p, t) in adversarial:
                self.discriminators[self.pair_key(p, t)] = Discriminator.for_maps(t_shape)

    def teacher_wants(self, assignment):
        if self.routes is None:
            return super().teacher_wants(assignment)
        return {t: {self.t_taps[t]} for _, t in self.pairs}

    def routing(self, teach, p: int) -> tuple[list[int], list[int]]:
        """(teachers of the feature loss, teachers of the adversarial loss) of peer p at this step."""
        return self.routes[p] if self.routes else (self.active(teach, p),) * 2

    def aligned(self, out, p: int, t: int) -> torch.Tensor:
        """A(E_S) of peer p for teacher t, once per forward (the discriminators' phase and the loss share it)."""
        return out.memo((self.key, "aligned", p, t), lambda: self.align[self.pair_key(p, t)](out.taps[p][self.tap]))

    def update_phases(self):
        opt = discriminator_optimizer(self.discriminators.parameters(), self.cfg.discriminator)
        return [UpdatePhase("discriminator", opt, self.discriminator_loss)]

    def discriminator_loss(self, out, batch, teach):
        """Every discriminator's BCE (real = the teacher's map, fake = the aligned peer map, both detached)."""
        losses = torch.stack([self.discriminators[self.pair_key(p, t)].loss(teach.taps[t][self.t_taps[t]],
                                                                          self.aligned(out, p, t))
                              for p in range(self.num_peers) for t in self.routing(teach, p)[1]])
        return {"loss": losses.sum(), "discriminator": losses.detach().mean()}

    def forward(self, out, batch, teach=None):
        cfg = self.cfg
        feature, adversarial = [], []
        for p in range(self.num_peers):
            f_teachers, a_teachers = self.routing(teach, p)
            feature.append(torch.stack([MF.fitnet_mse(self.aligned(out, p, t), teach.taps[t][self.t_taps[t]])
                                        for t in f_teachers]).mean())
            adversarial.append(torch.stack([self.discriminators[self.pair_key(p, t)].fool(self.aligned(out, p, t))
                                            for t in a_teachers]).mean())
        feature, adversarial = torch.stack(feature), torch.stack(adversarial)
        per_peer = cfg.feature_weight * feature + cfg.adversarial_weight * adversarial
        return {"loss": per_peer.sum(), "per_peer": per_peer, "feature": feature.sum(),
                "adversarial": adversarial.sum()}
