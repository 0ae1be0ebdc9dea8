"""AdaIN statistics transfer from an offline teacher (METHODS.md §2.7, reconstructed): the student's channel
statistics are injected into the teacher's map through AdaIN, and the frozen teacher judges the result (its next
stage, or its logits), through `Teacher.remainder`, whose parameters stay frozen while activations keep their
gradient.

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: ce}
        - {name: adain, weight: 100.0, feat_weight: 100.0, head: next_stage}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig, stage_taps
from mutualkd.registry import register_term

ADAIN_RULE = "AdaIN needs H×W equal at each tap; its 1×1 connector maps only C_S -> C_T"


class AdaINConfig(TeacherTermConfig):
    """AdaIN statistics transfer (METHODS §2.7, reconstructed): weight = λ_ada on Σ_l L_AdaIN, plus
    feat_weight = λ_feat on the connector's FitNet-style loss at the last tap."""

    name: Literal["adain"] = "adain"
    weight: float = Field(100.0, ge=0.0)
    feat_weight: float = Field(100.0, ge=0.0)
    taps: list[str] | None = None  # None: the last two stages
    teacher_taps: list[str] | None = None  # None: the names in `taps`, or the teacher's own last two stages
    head: Literal["next_stage", "logits"] = "next_stage"
    T: float = Field(4.0, gt=0.0)  # head=logits: KD temperature
    statistics_only: bool = False  # ablation baseline: mean ‖μ_S − μ_T‖² + ‖σ_S − σ_T‖² through the connector


def _last_stages(n: int, i: int):
    """Default-tap picker: the i-th of a network's last n stages (None if it has fewer)."""

    def pick(shapes):
        stages = stage_taps(shapes)
        return stages[i - n] if len(stages) >= n else None

    return pick


@register_term("adain", AdaINConfig)
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
                raise UserError(f"{key}.{field}: {value} must name distinct taps; leave it unset for the last two "
                                "stages")
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
