"""FSP, the flow of solution procedure, from an offline teacher (METHODS.md §2.4): λ·Σ_pairs mean(G_S − sg G_T)²,
G the FSP matrix of each consecutive pair of taps (stem, stage1..S by default). RepDistiller first trains on FSP
alone for 30 epochs (`objective.stages`).

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: fsp, weight: 50.0, adapter: none}
        - {name: ce}
      stages:
        - {epochs: 30, terms: [fsp]}
        - {epochs: 240, terms: [ce]}
"""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from pydantic import Field
from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig, poolable, resolve_tap_list, stage_taps
from mutualkd.registry import register_term


class FSPConfig(TeacherTermConfig):
    """FSP (METHODS §2.4): λ·Σ_pairs mean(G_S − G_T)², λ = 50, G over consecutive taps (stem, stage1..S)."""

    name: Literal["fsp"] = "fsp"
    weight: float = Field(50.0, ge=0.0)
    taps: list[str] | None = None  # None: stem, stage1, ..., stageS; G for each consecutive pair
    teacher_taps: list[str] | None = None  # None: the names in `taps`, or the teacher's own stem, stage1..S
    adapter: Literal["none", "conv1x1"] = "none"  # Gap: none errors at build time when channels differ


FSP_RULE = ("FSP needs every student map's channels equal to the teacher's (adapter: conv1x1 adds trainable 1x1 "
            "convs C_S -> C_T) and [C, H, W] maps whose H×W pool to a common size within each consecutive pair")


def fsp_taps(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """FSP's default taps: stem, stage1..S (G for each consecutive pair, i.e. the first and last map of a stage)."""
    return ["stem", *stage_taps(shapes)]


@register_term("fsp", FSPConfig)
class FSP(TeacherTerm):
    """FSP: λ·Σ_pairs mean_{b,c1,c2}(G_S − sg G_T)², G the fsp_matrix of each consecutive pair of taps (stem,
    stage1..S by default; the larger map of a pair is pooled). The channels must equal the teacher's; with
    `adapter: conv1x1` (Gap) each student map whose channels differ goes through a trainable 1x1 conv
    C_S -> C_T, one per (peer, teacher) pair and tap, in the peers' optimizer."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.taps, self.t_taps = resolve_tap_list(self, cfg.taps, cfg.teacher_taps, fsp_taps)
        if len(self.taps) < 2:
            raise UserError(f"{key}.taps: FSP needs at least two taps (G pairs consecutive maps), got {self.taps}")
        self.student_taps = set(self.taps)
        self.teacher_taps = {tap for taps in self.t_taps.values() for tap in taps}
        self.adapters = nn.ModuleDict()
        for p, t in self.pairs:
            convs = nn.ModuleDict()
            for i, (s_tap, t_tap) in enumerate(zip(self.taps, self.t_taps[t])):
                s_shape, t_shape = self.student_shape(p, s_tap), self.teacher_shape(t, t_tap)
                if len(s_shape) != 3 or len(t_shape) != 3 or (s_shape[0] != t_shape[0] and cfg.adapter == "none"):
                    raise self.shape_error(p, t, s_tap, t_tap, FSP_RULE)
                if s_shape[0] != t_shape[0]:
                    convs[str(i)] = nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False)
            self._check_within_pairs(self.peer_names[p], self.taps, self.peer_shapes[p])
            self._check_within_pairs(self.teacher(t).name, self.t_taps[t], self.teacher(t).tap_shapes)
            self.adapters[self.pair_key(p, t)] = convs

    def _check_within_pairs(self, who: str, taps: list[str], shapes: dict) -> None:
        for a, b in pairwise(taps):
            if not poolable(shapes[a], shapes[b]):
                raise UserError(f"{self.key} (fsp): cannot pair {who} {a} {list(shapes[a])} with {b} "
                                f"{list(shapes[b])}: {FSP_RULE} (METHODS.md §2.11)")

    def pair_loss(self, p, t, out, teach, batch):
        convs = self.adapters[self.pair_key(p, t)]
        f_s = [convs[str(i)](out.taps[p][tap]) if str(i) in convs else out.taps[p][tap]
               for i, tap in enumerate(self.taps)]
        f_t = [teach.taps[t][tap] for tap in self.t_taps[t]]
        return sum(MF.fsp_loss(f_s[i], f_s[i + 1], f_t[i], f_t[i + 1]) for i in range(len(f_s) - 1))
