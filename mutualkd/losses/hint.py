"""Feature-map hints from offline teachers: FitNets, attention transfer, FSP and neuron selectivity transfer
(METHODS.md §2.2-2.5)."""

from __future__ import annotations

from itertools import pairwise

from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.objective import register
from mutualkd.losses.teacher import (
    TeacherTerm,
    conv_regressor,
    last_stage,
    middle_stage,
    stage_taps,
)

FITNET_RULE = ("FitNets needs C and H×W equal after the regressor, which maps C_S -> C_T and changes H×W only by "
               "an integer factor (strided conv if the student map is larger, transposed conv if smaller)")


@register("fitnet")
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


def poolable(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Both shapes are [C, H, W] maps and one is at least as large as the other in H and W, so adaptive average
    pooling of the larger one gives both the same H×W (AT, NST, FSP; METHODS §2.11)."""
    if len(a) != 3 or len(b) != 3:
        return False
    (ha, wa), (hb, wb) = a[1:], b[1:]
    return (ha >= hb and wa >= wb) or (hb >= ha and wb >= wa)


def resolve_tap_list(term: TeacherTerm, taps: list[str] | None, teacher_taps: list[str] | None,
                     default) -> tuple[list[str], dict[int, list[str]]]:
    """(student taps, teacher index -> teacher taps) of a term over several taps, paired by position: `taps` /
    `teacher_taps` as configured (a teacher's list defaults to `taps`), else `default(shapes)` (a list) of each
    network, which must then have as many default taps as the peers."""
    if taps == []:
        raise UserError(f"{term.key}.taps: empty; name the taps, or leave taps unset for the default")
    n = len(taps) if taps is not None else len(default(term.peer_shapes[0]))
    teachers = sorted({t for _, t in term.pairs})
    if taps is None:
        for p, shapes in enumerate(term.peer_shapes):
            if default(shapes) != default(term.peer_shapes[0]):
                raise UserError(f"{term.key}.taps: the default taps differ between peers ({default(term.peer_shapes[0])} "
                                f"vs {default(shapes)} for {term.peer_names[p]}); set taps explicitly")
        if teacher_taps is None:
            for t in teachers:
                own = default(term.teacher(t).tap_shapes)
                if len(own) != n:
                    raise UserError(f"{term.key}.taps: the peers have {n} default taps {default(term.peer_shapes[0])}, "
                                    f"{term.teacher(t).name} has {len(own)} {own}; set taps and teacher_taps")
    if teacher_taps is not None and len(teacher_taps) != n:
        raise UserError(f"{term.key}.teacher_taps: {len(teacher_taps)} taps for {n} student taps (paired by position)")
    s_taps, t_taps = [], {t: [] for t in teachers}
    for i in range(max(n, 1)):  # n = 0: resolve_taps reports the missing default with the available taps
        s, ts = term.resolve_taps(f"taps.{i}", taps[i] if taps else None, teacher_taps[i] if teacher_taps else None,
                                  lambda shapes, i=i: (default(shapes)[i:i + 1] or [None])[0])
        s_taps.append(s)
        for t, name in ts.items():
            t_taps[t].append(name)
    return s_taps, t_taps


POOL_RULE = ("H×W must match after adaptive-average-pooling the larger map, so both taps must be [C, H, W] maps, "
             "one at least as large as the other in both H and W")


@register("at")
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


FSP_RULE = ("FSP needs every student map's channels equal to the teacher's (adapter: conv1x1 adds trainable 1x1 "
            "convs C_S -> C_T) and [C, H, W] maps whose H×W pool to a common size within each consecutive pair")


def fsp_taps(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """FSP's default taps: stem, stage1..S (G for each consecutive pair, i.e. the first and last map of a stage)."""
    return ["stem", *stage_taps(shapes)]


@register("fsp")
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


@register("nst")
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
