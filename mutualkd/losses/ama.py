"""Activation-map adaptation from an offline teacher (METHODS.md §2.8, reconstructed): a trainable M_φ replaces
the teacher's stage k+1 and learns the task through the frozen remainder of the teacher; the student hints on
M_φ's map.

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: ce}
        - {name: ama, weight: 100.0, width: student, module_ce_weight: 1.0}
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig, conv_regressor, middle_stage, stage_taps
from mutualkd.registry import register_term

AMA_RULE = ("activation-map adaptation needs C and H×W equal after the regressor, which maps C_S -> C_T and changes "
            "H×W only by an integer factor")


class AMAConfig(TeacherTermConfig):
    """Activation-map adaptation (METHODS §2.8, reconstructed): a trainable M_φ replaces the teacher's stage k+1;
    the student matches A = M_φ(T_front(x)) through a regressor (weight λ = 100); M_φ learns CE(T_back(A), y)."""

    name: Literal["ama"] = "ama"
    weight: float = Field(100.0, ge=0.0)
    stage: int | None = Field(None, ge=1)  # k: None = the middle stage; M_φ replaces teacher stage k+1
    width: Literal["student", "teacher"] = "student"  # M_φ's hidden width: the student's stage-(k+1) channels
    kernel_size: Literal[1, 3] = 3
    module_ce_weight: float = Field(1.0, ge=0.0)  # M_φ's CE through the frozen teacher remainder
    module_kd_weight: float = Field(0.0, ge=0.0)  # optional KD from the original teacher logits into T_back(A)
    T: float = Field(4.0, gt=0.0)


@register_term("ama", AMAConfig)
class AMA(TeacherTerm):
    """Activation-map adaptation (§2.8, reconstructed). The teacher is split at stage k (default its middle stage):
    T_front = stages ≤ k (the teacher's stage-k tap, detached), a trainable M_φ per (peer, teacher) replacing stage
    k+1, and the frozen T_back = `remainder(stage{k+1}, ·, "logits")`. M_φ = conv(kernel_size, strided to stage
    k+1's H×W)–BN–ReLU to a hidden width (`width: student`: the peer's stage-(k+1) channels; `teacher`: the
    teacher's), then 1×1 conv–BN–ReLU to the teacher's stage-(k+1) channels, so A = M_φ(T_front(x)) has the
    teacher's stage-(k+1) shape.

    - Student: hint = mean(r(F_S^{k+1}) − sg(A))², r a FitNets conv regressor; weighted by `weight` = λ.
    - M_φ: module = module_ce_weight·CE(T_back(A), y) + module_kd_weight·KD_T(z_T → T_back(A)), NOT scaled by λ:
      `loss` = hint + module/weight, so the objective's weight·loss = λ·hint + module.

    METHODS gives M_φ its own SGD at the student's lr. Here M_φ joins the peers' optimizer instead: the hint
    reaches only the peers and r (A is detached) and the module loss only M_φ (T_front is detached, the teacher
    frozen), so with per-parameter SGD/AdamW state and equal hyperparameters one optimizer over both is the same
    as two. (A global `train.clip_grad_norm` couples them; a weight `ramp` scales M_φ's losses too.)
    Several teachers per peer: the hint is averaged over them, each M_φ keeps its full loss. Logged parts: `hint`,
    `module_ce` / `module_kd` (unweighted, those with a non-zero weight).
    """

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.num_classes = ctx.num_classes
        if cfg.weight == 0:
            raise UserError(f"{key}.weight: 0 would also switch off M_φ's own losses (returned divided by weight); "
                            "remove the term instead")
        if cfg.module_ce_weight == 0 and cfg.module_kd_weight == 0:
            raise UserError(f"{key}.module_ce_weight: module_ce_weight and module_kd_weight are both 0, so M_φ would "
                            "never be trained")
        k = self._split_stage(cfg.stage)
        self.front, self.split = f"stage{k}", f"stage{k + 1}"
        self.student_taps, self.teacher_taps = {self.split}, {self.front}
        for p in range(self.num_peers):
            self._check_tap("stage", self.split, self.peer_shapes[p], self.peer_names[p])
        self.phi, self.regressors = nn.ModuleDict(), nn.ModuleDict()
        for p, t in self.pairs:
            s_shape, a_shape = self.student_shape(p, self.split), self.teacher_shape(t, self.split)
            reg = conv_regressor(s_shape, a_shape) if len(s_shape) == 3 and len(a_shape) == 3 else None
            if reg is None:
                raise self.shape_error(p, t, self.split, self.split, AMA_RULE)
            hidden = s_shape[0] if cfg.width == "student" else a_shape[0]
            self.phi[self.pair_key(p, t)] = self._module(t, hidden)
            self.regressors[self.pair_key(p, t)] = reg

    def _split_stage(self, stage: int | None) -> int:
        """k: `stage`, or the teachers' (common) middle stage; teacher stage k+1 must exist."""
        ks = {}
        for t in sorted({t for _, t in self.pairs}):
            teacher = self.teacher(t)
            teacher.plan()  # a UserError unless the teacher can be run from an inner tap
            n = len(stage_taps(teacher.tap_shapes))
            k = stage if stage is not None else (int(middle_stage(teacher.tap_shapes)[5:]) if n else 0)
            if not 1 <= k < n:
                raise UserError(f"{self.key}.stage: {k} leaves no stage k+1 of {teacher.name} ({n} stages) for M_φ "
                                f"to replace; allowed 1..{n - 1}")
            if self.cfg.module_ce_weight and teacher.num_classes != self.num_classes:
                raise UserError(f"{self.key}.module_ce_weight: {teacher.name} has {teacher.num_classes} classes, the "
                                f"peers {self.num_classes}: M_φ's CE on the labels needs the same classes C "
                                "(METHODS.md §2.11); set module_ce_weight=0 and train M_φ by KD")
            ks[teacher.name] = k
        if len(set(ks.values())) > 1:
            raise UserError(f"{self.key}.stage: the teachers' middle stages differ ({ks}); set stage explicitly")
        return next(iter(ks.values()))

    def _module(self, t: int, hidden: int) -> nn.Sequential:
        (c_in, h, w), (c_out, ho, wo) = self.teacher_shape(t, self.front), self.teacher_shape(t, self.split)
        if h % ho or w % wo or h // ho != w // wo:
            raise UserError(f"{self.key} (ama): {self.teacher(t).name} {self.front} {[c_in, h, w]} cannot be strided "
                            f"to {self.split} {[c_out, ho, wo]} by M_φ's conv (needs an integer factor, "
                            "METHODS.md §2.11)")
        ks = self.cfg.kernel_size
        return nn.Sequential(
            nn.Conv2d(c_in, hidden, ks, stride=h // ho, padding=ks // 2, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )

    def adapted(self, p: int, t: int, teach) -> tuple[torch.Tensor, torch.Tensor]:
        """(A = M_φ(sg T_front(x)), T_back(A)) for peer p's module on teacher t."""
        a = self.phi[self.pair_key(p, t)](teach.taps[t][self.front].detach())
        return a, self.teacher(t).remainder(self.split, a, "logits")

    def forward(self, out, batch, teach=None):
        cfg = self.cfg
        hint, module, ce, kd = [], [], [], []
        for p in range(self.num_peers):
            hints, mods = [], []
            for t in self.active(teach, p):
                a, z = self.adapted(p, t, teach)
                hints.append(MF.fitnet_mse(self.regressors[self.pair_key(p, t)](out.taps[p][self.split]), a))
                if cfg.module_ce_weight:
                    ce.append(F.cross_entropy(z.float(), batch["target"]))
                    mods.append(cfg.module_ce_weight * ce[-1])
                if cfg.module_kd_weight:
                    kd.append(MF.kd_kl(z, teach.logits[t], cfg.T))
                    mods.append(cfg.module_kd_weight * kd[-1])
            hint.append(torch.stack(hints).mean())
            module.append(torch.stack(mods).sum())
        per_peer = torch.stack(hint) + torch.stack(module) / cfg.weight
        parts = {"loss": per_peer.sum(), "per_peer": per_peer, "hint": torch.stack(hint).sum()}
        if ce:
            parts["module_ce"] = torch.stack(ce).sum()
        if kd:
            parts["module_kd"] = torch.stack(kd).sum()
        return parts
