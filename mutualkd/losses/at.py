"""Attention transfer from an offline teacher (METHODS.md §2.3): β·Σ_l mean_{b,hw}(Q(F_S^l) − Q(sg F_T^l))²,
Q = normalize(vec(mean_c F^p)), over stage1..S by default; of each pair of maps the larger is pooled.

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: ce}
        - {name: at, weight: 1000.0, p: 2.0}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import (
    POOL_RULE,
    TeacherTerm,
    TeacherTermConfig,
    poolable,
    resolve_tap_list,
    stage_taps,
)
from mutualkd.registry import register_term


class ATConfig(TeacherTermConfig):
    """Attention transfer (METHODS §2.3): β·Σ_l mean_{b,hw}(Q_S − Q_T)², β = 1000, every stage by default."""

    name: Literal["at"] = "at"
    weight: float = Field(1000.0, ge=0.0)
    taps: list[str] | None = None  # None: stage1..S
    teacher_taps: list[str] | None = None  # None: the names in `taps`, or the teacher's own stage1..S
    p: float = Field(2.0, gt=0.0)
    paper_norm: bool = False  # [reconstructed] (β/2)·‖Q_S − Q_T‖₂ per sample (not squared), batch mean


@register_term("at", ATConfig)
class AT(TeacherTerm):
    """Attention transfer: β·Σ_l mean_{b,hw}(Q(F_S^l) − Q(sg F_T^l))², Q = normalize(vec(mean_c F^p)), over
    stage1..S by default; of each pair of maps the larger is pooled to the smaller H×W. `paper_norm`: the
    paper's unsquared (β/2)·‖Q_S − Q_T‖₂ per sample, batch mean."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.taps, self.t_taps = resolve_tap_list(self, cfg.taps, cfg.teacher_taps, stage_taps)
        self.student_taps = set(self.taps)
        self.teacher_taps = {tap for taps in self.t_taps.values() for tap in taps}
        for p, t in self.pairs:
            for s_tap, t_tap in zip(self.taps, self.t_taps[t]):
                if not poolable(self.student_shape(p, s_tap), self.teacher_shape(t, t_tap)):
                    raise self.shape_error(p, t, s_tap, t_tap, f"AT: {POOL_RULE}")

    def pair_loss(self, p, t, out, teach, batch):
        return sum(MF.attention_transfer(out.taps[p][s_tap], teach.taps[t][t_tap], self.cfg.p, self.cfg.paper_norm)
                   for s_tap, t_tap in zip(self.taps, self.t_taps[t]))
