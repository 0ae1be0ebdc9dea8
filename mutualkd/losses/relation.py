"""Relation terms from offline teachers (METHODS.md §2.6): the affinity × normalisation × loss grid (`relation`)
and its named instances SP, RKD, PKT and CC. Each compares B×B structure of one tap, so student and teacher
widths may differ; under data parallelism the relations span the all-gathered global batch (`global_batch`,
METHODS §0.5).

    teachers: [{run: runs/teacher}]
    objective:
      terms:
        - {name: ce}
        - {name: relation, tap: pre_logits, affinity: cosine, normalisation: row_l1, loss: kl}
        - {name: pkt, weight: 30000.0}
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from mutualkd.losses import functional as MF
from mutualkd.losses.teacher import TeacherTerm, TeacherTermConfig, last_stage
from mutualkd.registry import register_term


class _OneTapConfig(TeacherTermConfig):
    tap: str | None = None  # None: the last stage
    teacher_tap: str | None = None
    global_batch: bool = True  # data-parallel: relations over the all-gathered global batch (METHODS §0.5)


class RelationConfig(_OneTapConfig):
    """The relation framework (METHODS §2.6): w·ℓ(N(A(Z_S)), sg(N(A(Z_T)))) on one tap, B×B."""

    name: Literal["relation"] = "relation"
    tap: str = "pre_logits"
    affinity: Literal["dot", "cosine", "euclidean", "gaussian"] = "cosine"
    normalisation: Literal["none", "row_l2", "mean", "row_l1", "row_softmax"] = "row_l1"
    loss: Literal["mse", "l1", "smooth_l1", "kl"] = "kl"
    tau: float = Field(1.0, gt=0.0)  # row_softmax temperature [reconstructed]
    gamma: float = Field(1.0, gt=0.0)  # gaussian affinity


class SPConfig(_OneTapConfig):
    """Similarity preserving (METHODS §2.6): (dot, row_l2, mse) on the flattened last-stage map, weight 3000."""

    name: Literal["sp"] = "sp"
    weight: float = Field(3000.0, ge=0.0)


class RKDConfig(_OneTapConfig):
    """RKD (METHODS §2.6): distance_weight·RKD-D + angle_weight·RKD-A on the pooled embedding (RepDistiller 25, 50)."""

    name: Literal["rkd"] = "rkd"
    tap: str = "pre_logits"
    distance_weight: float = Field(25.0, ge=0.0)
    angle_weight: float = Field(50.0, ge=0.0)
    normalize: bool = False  # lenscloth/RKD's classification script L2-normalises the embeddings


class PKTConfig(_OneTapConfig):
    """PKT (METHODS §2.6): (cosine, row_l1, kl) on the pooled embedding, weight 30000."""

    name: Literal["pkt"] = "pkt"
    weight: float = Field(30000.0, ge=0.0)
    tap: str = "pre_logits"


class CCConfig(_OneTapConfig):
    """Correlation congruence (METHODS §2.6), `form` repdistiller (weight 0.02) or rbf_taylor (weight 100)."""

    name: Literal["cc"] = "cc"
    weight: float | None = Field(None, ge=0.0)  # None: 0.02 (repdistiller) or 100 (rbf_taylor)
    form: Literal["repdistiller", "rbf_taylor"] = "repdistiller"
    tap: str = "pre_logits"
    embed_dim: int = Field(128, ge=1)  # repdistiller: trainable Linear embeddings on both sides [reconstructed]
    gamma: float = Field(0.4, gt=0.0)  # rbf_taylor
    order: int = Field(2, ge=0)  # rbf_taylor

    @model_validator(mode="after")
    def _form_weight(self) -> CCConfig:
        if self.weight is None:
            self.weight = 0.02 if self.form == "repdistiller" else 100.0
        return self


class _OneTap(TeacherTerm):
    """A relation term on one tap (`tap`, `teacher_tap`; None: the last stage)."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        self.tap, self.t_taps = self.resolve_taps("tap", cfg.tap, cfg.teacher_tap, last_stage)
        self.student_taps, self.teacher_taps = {self.tap}, set(self.t_taps.values())

    def features(self, p: int, t: int, out, teach):
        """(student, teacher) tensors of the pair at the term's taps, over the global batch if `global_batch`."""
        z_s, z_t = out.taps[p][self.tap], teach.taps[t][self.t_taps[t]]
        if self.cfg.global_batch:
            z_s, z_t = self.placement.gather_batch(z_s), self.placement.gather_batch(z_t)
        return z_s, z_t


@register_term("relation", RelationConfig)
class Relation(_OneTap):
    """w·ℓ(N(A(Z_S)), sg N(A(Z_T))) with A, N and ℓ chosen from the grid, Z the tap flattened to [B, D]."""

    def pair_loss(self, p, t, out, teach, batch):
        c = self.cfg
        return MF.relation(*self.features(p, t, out, teach), c.affinity, c.normalisation, c.loss, c.tau, c.gamma)


@register_term("sp", SPConfig)
class SP(_OneTap):
    """Similarity preserving: (dot, row_l2, mse) on the last-stage map flattened to [B, C·H·W] (not pooled)."""

    def pair_loss(self, p, t, out, teach, batch):
        return MF.sp_loss(*self.features(p, t, out, teach))


@register_term("rkd", RKDConfig)
class RKD(_OneTap):
    """Relational KD: distance_weight·RKD-D + angle_weight·RKD-A on the tap (default pre_logits), optionally on
    L2-normalised embeddings (lenscloth/RKD's classification script); a component of weight 0 is not computed."""

    def pair_loss(self, p, t, out, teach, batch):
        c = self.cfg
        z_s, z_t = (z.float().flatten(1) for z in self.features(p, t, out, teach))
        if c.normalize:
            z_s, z_t = F.normalize(z_s, dim=1), F.normalize(z_t, dim=1)
        loss = z_s.new_zeros(())
        if c.distance_weight:
            loss = loss + c.distance_weight * MF.rkd_distance(z_s, z_t)
        if c.angle_weight:
            loss = loss + c.angle_weight * MF.rkd_angle(z_s, z_t)
        return loss


@register_term("pkt", PKTConfig)
class PKT(_OneTap):
    """Probabilistic knowledge transfer: (cosine, row_l1, kl) on the tap (default pre_logits)."""

    def pair_loss(self, p, t, out, teach, batch):
        return MF.pkt_loss(*self.features(p, t, out, teach))


@register_term("cc", CCConfig)
class CC(_OneTap):
    """Correlation congruence on the tap (default pre_logits). `repdistiller`: both sides pass through trainable
    Linear embeddings to `embed_dim` (one pair per (peer, teacher), in the peers' optimizer; the teacher-side
    one takes the detached teacher feature and is trained by this loss too, as in RepDistiller), then
    mean_b Σ_c |Δ_b,c|·|Δ_b+1,c| with Δ = e_S − e_T. `rbf_taylor`: mse between the order-R Taylor-RBF
    correlation matrices of the L2-normalised features (γ = 0.4, R = 2)."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        if cfg.form == "repdistiller":
            self.embed_s, self.embed_t = nn.ModuleDict(), nn.ModuleDict()
            for p, t in self.pairs:
                key_pt = self.pair_key(p, t)
                self.embed_s[key_pt] = nn.Linear(math.prod(self.student_shape(p, self.tap)), cfg.embed_dim)
                self.embed_t[key_pt] = nn.Linear(math.prod(self.teacher_shape(t, self.t_taps[t])), cfg.embed_dim)

    def pair_loss(self, p, t, out, teach, batch):
        z_s, z_t = self.features(p, t, out, teach)
        if self.cfg.form == "rbf_taylor":
            return MF.cc_rbf_taylor(z_s, z_t, self.cfg.gamma, self.cfg.order)
        key = self.pair_key(p, t)
        return MF.cc_repdistiller(self.embed_s[key](z_s.flatten(1)), self.embed_t[key](z_t.detach().flatten(1)))
