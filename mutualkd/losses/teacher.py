"""Shared plumbing of teacher -> peer terms (METHODS.md §2): their config base, which teacher teaches which
peer, taps chosen by name and checked against the dry-run shapes at build time, per-(peer, teacher) adapters,
shape errors that name both shapes and the METHODS.md §2.11 rule.

A subclass sets `student_taps` / `teacher_taps`, builds its adapters from `pairs` in `__init__`, and
implements `pair_loss(p, t, out, teach, batch)`: the loss of peer p toward teacher t (a scalar, before the
term's weight). The base averages over the teachers that teach p at this step (the policy's assignment,
or the one `teacher:` of the term) and sums over peers.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn

from mutualkd.config import TermConfig
from mutualkd.errors import UserError
from mutualkd.losses.base import BuildContext, Term

_STAGE = re.compile(r"^stage(\d+)$")


class TeacherTermConfig(TermConfig):
    """A loss from frozen offline teachers to every peer (summed over peers).

    `teacher`: the one teacher this term uses; None: the teachers `teacher_policy` picks for each peer and step.
    Taps are named as in the peer group (`stem`, `stage1..S`, `pre_logits`, `logits`, or `feature{i}`);
    `teacher_tap` None means the same name as the student's.
    """

    teacher: str | None = None
    teacher_fields: ClassVar[tuple[str, ...]] = ("teacher",)


def stage_taps(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """`stage1..S` taps present in a network's tap shapes, in order."""
    return sorted((k for k in shapes if _STAGE.match(k)), key=lambda k: int(k[5:]))


def conv_regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> nn.Module | None:
    """FitNets' regressor C_S -> C_T (METHODS §2.2): 3x3 conv + BN + ReLU when H×W match, a strided 3x3 conv when
    the student map is an integer factor larger, a transposed conv when smaller; None if no such factor."""
    (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
    if (hs, ws) == (ht, wt):
        conv = nn.Conv2d(cs, ct, 3, padding=1, bias=False)
    elif hs % ht == 0 and ws % wt == 0 and hs // ht == ws // wt:
        conv = nn.Conv2d(cs, ct, 3, stride=hs // ht, padding=1, bias=False)
    elif ht % hs == 0 and wt % ws == 0 and ht // hs == wt // ws:
        conv = nn.ConvTranspose2d(cs, ct, ht // hs, stride=ht // hs, bias=False)
    else:
        return None
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU(inplace=True))


class TeacherTerm(Term):
    """Base of teacher -> peer terms. `teacher_taps` empty: the teachers are not run on the batch (LW-KD)."""

    needs_teacher = True

    def __init__(self, cfg, ctx: BuildContext, key: str):
        super().__init__(cfg, ctx, key)
        if ctx.teachers is None:
            raise UserError(f"{key} ({cfg.name}): a teacher term needs teachers; add a `teachers:` list")
        self._teachers = [ctx.teachers]  # a list: the frozen teachers are not this module's submodules
        self.fixed = ctx.teachers.index(cfg.teacher) if getattr(cfg, "teacher", None) else None
        self.peer_shapes = ctx.tap_shapes
        self.peer_names = ctx.peer_names
        self.student_taps: set[str] = set()
        self.teacher_taps: set[str] = set()
        self.pairs = [(p, t) for p in range(self.num_peers) for t in self.candidates(p)]

    # ------------------------------------------------------------------------------------ who teaches whom
    @property
    def teacher_set(self):
        return self._teachers[0]

    def teacher(self, t: int):
        return self.teacher_set.teachers[t]

    def candidates(self, p: int) -> list[int]:
        return [self.fixed] if self.fixed is not None else self.teacher_set.candidates(p)

    def active(self, teach, p: int) -> list[int]:
        return [self.fixed] if self.fixed is not None else teach.assignment[p]

    def teacher_wants(self, assignment):
        if not self.teacher_taps:
            return {}
        ids = {self.fixed} if self.fixed is not None else {t for ts in assignment for t in ts}
        return {t: set(self.teacher_taps) for t in ids}

    def require_classes(self, num_classes: int, rule: str) -> None:
        """Build-time check that every teacher this term may use has the peers' classes (logit-level methods)."""
        for t in sorted({t for _, t in self.pairs}):
            if self.teacher(t).num_classes != num_classes:
                teacher = self.teacher(t)
                raise UserError(f"{self.key} ({self.cfg.name}): {teacher.name} has {teacher.num_classes} classes, "
                                f"the peers {num_classes}: {rule}")

    # ---------------------------------------------------------------------------------------- taps, shapes
    def student_shape(self, p: int, tap: str) -> tuple[int, ...]:
        return self.peer_shapes[p][tap]

    def teacher_shape(self, t: int, tap: str) -> tuple[int, ...]:
        return self.teacher(t).tap_shapes[tap]

    def resolve_taps(self, field: str, tap: str | None, teacher_tap: str | None, default) -> tuple[str, dict[int, str]]:
        """(student tap, teacher index -> teacher tap). `default(shapes)` picks a tap from a network's tap shapes
        when `tap` is None; a teacher tap defaults to `tap` if given, else to the teacher's own default."""
        s_tap = tap
        for p in range(self.num_peers):
            name = tap or default(self.peer_shapes[p])
            self._check_tap(f"{field}", name, self.peer_shapes[p], self.peer_names[p])
            if s_tap is None:
                s_tap = name
            elif name != s_tap:
                raise UserError(f"{self.key}.{field}: the default tap differs between peers ({s_tap} vs {name} for "
                                f"{self.peer_names[p]}); set {field} explicitly")
        t_taps = {}
        for t in sorted({t for _, t in self.pairs}):
            shapes = self.teacher(t).tap_shapes
            name = teacher_tap or tap or default(shapes)
            self._check_tap(f"teacher_{field}", name, shapes, self.teacher(t).name)
            t_taps[t] = name
        return s_tap, t_taps

    def _check_tap(self, field: str, name: str | None, shapes: dict, who: str) -> None:
        if name is None or name not in shapes:
            what = f"no tap {name!r}" if name else "no default tap"
            raise UserError(f"{self.key}.{field}: {who} has {what}; its taps: {', '.join(sorted(shapes))}")

    def shape_error(self, p: int, t: int, s_tap: str, t_tap: str, rule: str) -> UserError:
        """A build-time error naming both taps with their shapes and the METHODS.md §2.11 rule."""
        return UserError(
            f"{self.key} ({self.cfg.name}): cannot match {self.peer_names[p]} {s_tap} "
            f"{list(self.student_shape(p, s_tap))} with {self.teacher(t).name} {t_tap} "
            f"{list(self.teacher_shape(t, t_tap))}: {rule} (METHODS.md §2.11)"
        )

    @staticmethod
    def pair_key(p: int, t: int) -> str:
        return f"{p}_{t}"

    # -------------------------------------------------------------------------------------------- the loss
    def pair_loss(self, p: int, t: int, out, teach, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, out, batch, teach=None):
        per_peer = torch.stack([
            torch.stack([self.pair_loss(p, t, out, teach, batch) for t in self.active(teach, p)]).mean()
            for p in range(self.num_peers)
        ])
        return {"loss": per_peer.sum(), "per_peer": per_peer}


def last_stage(shapes: dict[str, tuple[int, ...]]) -> str | None:
    stages = stage_taps(shapes)
    return stages[-1] if stages else None


def middle_stage(shapes: dict[str, tuple[int, ...]]) -> str | None:
    stages = stage_taps(shapes)
    return stages[(len(stages) + 1) // 2 - 1] if stages else None


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
                raise UserError(f"{term.key}.taps: the default taps differ between peers "
                                f"({default(term.peer_shapes[0])} vs {default(shapes)} for {term.peer_names[p]}); "
                                "set taps explicitly")
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
