"""Teacher terms that run the frozen teacher onward from an inner tap (METHODS.md §2.7, §2.8): AdaIN statistics
transfer (`adain`) and activation-map adaptation (`ama`). Both evaluate maps through `Teacher.remainder`, whose
parameters stay frozen while activations keep their gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.objective import register
from mutualkd.losses.teacher import (
    TeacherTerm,
    conv_regressor,
    middle_stage,
    stage_taps,
)

ADAIN_RULE = "AdaIN needs H×W equal at each tap; its 1×1 connector maps only C_S -> C_T"
AMA_RULE = ("activation-map adaptation needs C and H×W equal after the regressor, which maps C_S -> C_T and changes "
            "H×W only by an integer factor")


def _last_stages(n: int, i: int):
    """Default-tap picker: the i-th of a network's last n stages (None if it has fewer)."""

    def pick(shapes):
        stages = stage_taps(shapes)
        return stages[i - n] if len(stages) >= n else None

    return pick


@register("adain")
class AdaIN(TeacherTerm):
    """AdaIN statistics transfer (§2.7, reconstructed). Per tap l, a trainable connector r_l (1×1 conv + BN,
    C_S -> C_T) and F_ada = σ(r(F_S))·(sg(F_T) − μ(F_T))/σ(F_T) + μ(r(F_S)), evaluated by the frozen teacher:

    - `head: next_stage`: L_l = mean(T_{l+1}(F_ada) − sg(T_{l+1}(F_T)))², the target being the teacher's own
      next-stage tap. After the LAST stage the next module is the head, so there T_{l+1} runs to the logits and the
      target is the teacher's logits (logit matching; the pooled pre-logits are not a tap `remainder` can stop at).
    - `head: logits`: L_l = KD_T(z_T → T_{>l}(F_ada)), z_T = T_{>l}(F_T) = the teacher's own (eval-mode) logits.
    - `statistics_only`: L_l = mean(μ_S − μ_T)² + mean(σ_S − σ_T)² of r(F_S) and F_T (the ablation baseline).

    Plus feat = mean(r(F_S^last) − sg(F_T^last))² at the last of `taps`. The objective multiplies `loss` by
    `weight` = λ_ada, so `loss` = Σ_l L_l + (feat_weight/weight)·feat gives exactly λ_ada·Σ_l L_l + λ_feat·feat;
    the parts `adain` (Σ_l L_l) and `feat` are logged unweighted.
    """

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        if cfg.weight == 0 and cfg.feat_weight > 0:
            raise UserError(f"{key}.weight: 0 would also switch off feat_weight (λ_feat is applied relative to "
                            "weight = λ_ada); give weight > 0")
        for field in ("taps", "teacher_taps"):
            value = getattr(cfg, field)
            if value is not None and (not value or len(set(value)) != len(value)):
                raise UserError(f"{key}.{field}: {value} must name distinct taps; leave it unset for the last two stages")
        n = len(cfg.taps or cfg.teacher_taps or ()) or 2
        if cfg.taps and cfg.teacher_taps and len(cfg.teacher_taps) != n:
            raise UserError(f"{key}.teacher_taps: {len(cfg.teacher_taps)} taps for the students' {n} ({cfg.taps})")
        s_names, t_names = cfg.taps or [None] * n, cfg.teacher_taps or [None] * n
        # per tap index: (student tap, teacher index -> teacher tap)
        self.taps = [self.resolve_taps("taps", s_names[i], t_names[i], _last_stages(n, i)) for i in range(n)]
        self.student_taps = {s_tap for s_tap, _ in self.taps}
        self.teacher_taps = {t_tap for _, t_taps in self.taps for t_tap in t_taps.values()}
        # per tap index, teacher index -> the teacher's next stage tap (None after the last stage)
        self.next_taps = [{t: self._next_tap(t, t_tap) for t, t_tap in t_taps.items()} for _, t_taps in self.taps]
        if cfg.head == "next_stage" and not cfg.statistics_only:
            self.teacher_taps |= {tap for nxt in self.next_taps for tap in nxt.values() if tap is not None}
        self.connectors = nn.ModuleDict()
        for p, t in self.pairs:
            per_tap = nn.ModuleDict()
            for s_tap, t_taps in self.taps:
                s_shape, t_shape = self.student_shape(p, s_tap), self.teacher_shape(t, t_taps[t])
                if len(s_shape) != 3 or len(t_shape) != 3 or s_shape[1:] != t_shape[1:]:
                    raise self.shape_error(p, t, s_tap, t_taps[t], ADAIN_RULE)
                per_tap[s_tap] = nn.Sequential(nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False),
                                               nn.BatchNorm2d(t_shape[0]))
            self.connectors[self.pair_key(p, t)] = per_tap

    def _next_tap(self, t: int, t_tap: str) -> str | None:
        teacher = self.teacher(t)
        labels = [label for _, label in teacher.plan() if label]
        if t_tap not in labels:
            field = "teacher_taps" if self.cfg.teacher_taps else "taps"
            raise UserError(f"{self.key}.{field}: {teacher.name} can be run onward only from {', '.join(labels)}; "
                            f"got {t_tap!r}")
        return teacher.next_tap(t_tap)

    def _tap_loss(self, t: int, i: int, t_tap: str, r: torch.Tensor, f_t: torch.Tensor, teach) -> torch.Tensor:
        if self.cfg.statistics_only:
            return MF.channel_stats_mse(r, f_t)
        teacher, f_ada = self.teacher(t), MF.adain_inject(r, f_t)
        if self.cfg.head == "logits":
            return MF.kd_kl(teacher.remainder(t_tap, f_ada, "logits"), teach.logits[t], self.cfg.T)
        nxt = self.next_taps[i][t]
        if nxt is None:
            return MF.fitnet_mse(teacher.remainder(t_tap, f_ada, "logits"), teach.logits[t])
        return MF.fitnet_mse(teacher.remainder(t_tap, f_ada, "next_stage"), teach.taps[t][nxt])

    def pair_parts(self, p: int, t: int, out, teach) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_l L_l, feat) of peer p toward teacher t."""
        connectors, losses = self.connectors[self.pair_key(p, t)], []
        for i, (s_tap, t_taps) in enumerate(self.taps):
            r, f_t = connectors[s_tap](out.taps[p][s_tap]), teach.taps[t][t_taps[t]]
            losses.append(self._tap_loss(t, i, t_taps[t], r, f_t, teach))
        return torch.stack(losses).sum(), MF.fitnet_mse(r, f_t)  # feat: at the last tap

    def forward(self, out, batch, teach=None):
        parts = torch.stack([  # [P, 2]: per peer, (Σ_l L_l, feat) averaged over the teachers teaching it
            torch.stack([torch.stack(self.pair_parts(p, t, out, teach)) for t in self.active(teach, p)]).mean(0)
            for p in range(self.num_peers)
        ])
        adain, feat = parts.unbind(1)
        ratio = self.cfg.feat_weight / self.cfg.weight if self.cfg.weight else 0.0
        per_peer = adain + ratio * feat
        return {"loss": per_peer.sum(), "per_peer": per_peer, "adain": adain.sum(), "feat": feat.sum()}


@register("ama")
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
                            f"to {self.split} {[c_out, ho, wo]} by M_φ's conv (needs an integer factor, METHODS.md §2.11)")
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
