"""Neuron selectivity transfer from an offline teacher (METHODS.md §2.5): λ·mean_b MMD²(T_b, S_b) between the
L2-normalised channel rows of the maps at one tap (default the last stage), poly / linear / gaussian kernel.

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: ce}
        - {name: nst, weight: 50.0, kernel: poly, degree: 2, c: 0.0}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import POOL_RULE, TeacherTerm, TeacherTermConfig, last_stage, poolable
from mutualkd.registry import register_term


class NSTConfig(TeacherTermConfig):
    """Neuron selectivity transfer (METHODS §2.5): λ·mean_b MMD², λ = 50 (RepDistiller), last stage."""

    name: Literal["nst"] = "nst"
    weight: float = Field(50.0, ge=0.0)
    tap: str | None = None  # None: the last stage
    teacher_tap: str | None = None
    kernel: Literal["poly", "linear", "gaussian"] = "poly"
    degree: int = Field(2, ge=1)
    c: float = 0.0


@register_term("nst", NSTConfig)
class NST(TeacherTerm):
    """Neuron selectivity transfer: λ·mean_b MMD²(T_b, S_b) between the L2-normalised channel rows of the maps at
    one tap (default the last stage), the larger map pooled to the smaller H×W. `gaussian`: σ² per sample is
    the detached mean pairwise squared distance over the joint set of rows. The teacher–teacher part is a
    constant off the gradient path (the teacher is detached) and stays in the logged value."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.tap, self.t_taps = self.resolve_taps("tap", cfg.tap, cfg.teacher_tap, last_stage)
        self.student_taps, self.teacher_taps = {self.tap}, set(self.t_taps.values())
        for p, t in self.pairs:
            if not poolable(self.student_shape(p, self.tap), self.teacher_shape(t, self.t_taps[t])):
                raise self.shape_error(p, t, self.tap, self.t_taps[t], f"NST: {POOL_RULE}")

    def pair_loss(self, p, t, out, teach, batch):
        cfg = self.cfg
        f_s, f_t = out.taps[p][self.tap], teach.taps[t][self.t_taps[t]]
        sigma2 = MF.nst_bandwidth(f_s, f_t) if cfg.kernel == "gaussian" else None
        return MF.nst_mmd(f_s, f_t, cfg.kernel, cfg.degree, cfg.c, sigma2)
