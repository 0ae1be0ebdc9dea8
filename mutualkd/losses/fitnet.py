"""FitNets hints from an offline teacher (METHODS.md §2.2): β·mean((r(F_S) − sg(F_T))²) at one tap (default the
middle stage), r a trainable conv regressor per (peer, teacher) pair; the paper's two stages are
`objective.stages` (a hint-only stage, then CE + KD).

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: ce}
        - {name: fitnet, weight: 100.0, tap: stage2}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig, conv_regressor, middle_stage
from mutualkd.registry import register_term

FITNET_RULE = ("FitNets needs C and H×W equal after the regressor, which maps C_S -> C_T and changes H×W only by "
               "an integer factor (strided conv if the student map is larger, transposed conv if smaller)")


class FitNetConfig(TeacherTermConfig):
    """FitNets hint (METHODS §2.2): β·mean((r(F_S) − sg(F_T))²) with a trainable regressor r, β = 100."""

    name: Literal["fitnet"] = "fitnet"
    weight: float = Field(100.0, ge=0.0)
    tap: str | None = None  # None: the middle stage, stage((S+1)//2) (RepDistiller hint_layer = 2)
    teacher_tap: str | None = None
    paper_form: bool = False  # [reconstructed] ½‖r(F_S) − F_T‖² summed per sample, batch mean


@register_term("fitnet", FitNetConfig)
class FitNet(TeacherTerm):
    """β·mean((r(F_S) − sg(F_T))²) at one tap (default the middle stage), r a trainable conv regressor per
    (peer, teacher) pair; `paper_form`: ½‖r(F_S) − F_T‖² per sample, batch mean."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.tap, self.t_taps = self.resolve_taps("tap", cfg.tap, cfg.teacher_tap, middle_stage)
        self.student_taps, self.teacher_taps = {self.tap}, set(self.t_taps.values())
        self.regressors = nn.ModuleDict()
        for p, t in self.pairs:
            s_shape, t_shape = self.student_shape(p, self.tap), self.teacher_shape(t, self.t_taps[t])
            reg = conv_regressor(s_shape, t_shape) if len(s_shape) == 3 and len(t_shape) == 3 else None
            if reg is None:
                raise self.shape_error(p, t, self.tap, self.t_taps[t], FITNET_RULE)
            self.regressors[self.pair_key(p, t)] = reg

    def pair_loss(self, p, t, out, teach, batch):
        f_s = self.regressors[self.pair_key(p, t)](out.taps[p][self.tap])
        f_t = teach.taps[t][self.t_taps[t]]
        if self.cfg.paper_form:
            return 0.5 * (f_s.float() - f_t.detach().float()).pow(2).flatten(1).sum(1).mean()
        return MF.fitnet_mse(f_s, f_t)
