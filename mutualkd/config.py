"""Typed configuration: YAML + dotted overrides -> a validated `Config`; every default lives here.

The schema defaults ARE the quickstart run (digits, two peers, CE + DML), so `mutualkd train` with no
arguments needs no file; `configs/quickstart.yaml` spells the same values out. Every mistake a user can
make surfaces as one `UserError` line naming the key, before anything is built.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mutualkd.errors import UserError

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "composed_digits")


class Strict(BaseModel):
    """No unknown keys, no silent type coercion (ints are accepted where floats are expected)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# --------------------------------------------------------------------------------------------- data
class SyntheticConfig(Strict):
    num_classes: int = Field(10, ge=2)
    train_size: int = Field(512, ge=4)
    test_size: int = Field(256, ge=1)
    image_size: int = Field(32, ge=8)
    channels: Literal[1, 3] = 3
    seed: int = 0


class ComposedConfig(Strict):
    """`composed_digits` (LW-KD's synthesised simple set, METHODS §2.10): class y is digit y (num_classes <= 10)
    or the two digits y // 10, y % 10 side by side (up to 100 classes; needs image_size >= 16)."""

    num_classes: int = Field(10, ge=2, le=100)
    image_size: int = Field(16, ge=8)


class DataConfig(Strict):
    name: Literal["digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic",
                  "composed_digits"] = "digits"
    root: str | None = None  # None: the dataset's standard place (fashion_mnist: Debian's package)
    download: bool = False  # cifar only; opt-in network access
    val_split: float = Field(0.1, ge=0.0, lt=0.5)  # stratified hold-out carved from train
    split_seed: int = 0
    image_size: int | None = Field(None, ge=8)  # imagefolder resize target
    batch_size: int = Field(64, ge=1)  # per process; the global batch is batch_size x processes
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    sampler: Literal["random", "m_per_class"] = "random"
    m_per_class: int = Field(2, ge=1)
    views: Literal["shared", "per_peer"] = "shared"  # per_peer: an independent augmentation per peer
    augment: bool = True
    crop_padding: int | None = Field(None, ge=0)  # None: the dataset's default
    flip: bool | None = None  # None: the dataset's default
    synthetic: SyntheticConfig = SyntheticConfig()
    composed: ComposedConfig = ComposedConfig()


# -------------------------------------------------------------------------------------------- peers
class PeerConfig(Strict):
    arch: str  # any timm model name, or one of mutualkd's CIFAR zoo
    name: str | None = None  # default "peer{i}"
    pretrained: bool = False  # timm hub weights; needs network unless cached
    model_kwargs: dict[str, int | float | bool | str] = {}  # passed to timm.create_model


class TeacherConfig(Strict):
    """A frozen offline teacher: a mutualkd run directory (a one-peer run is a teacher run), a safetensors file
    (a `mutualkd export`, or any timm weights with `arch`), or a timm model name (`pretrained: true` for hub
    weights). Exactly one of `run`, `file`, `arch` names the source (`file` may come with `arch`)."""

    name: str | None = None  # default "teacher{i}"
    run: str | None = None
    checkpoint: Literal["best", "last"] | None = None  # run: None = best.pt if the run has one, else last.pt
    peer: int | str = 0  # run: which of the run's peers (index or name)
    file: str | None = None
    arch: str | None = None
    pretrained: bool = False  # arch: timm hub weights (needs network unless cached)
    num_classes: int | None = Field(None, ge=1)  # arch: None = the dataset's classes (pretrained: the model's own)
    model_kwargs: dict[str, int | float | bool | str] = {}
    # The input the teacher expects; None takes it from the source (run's dataset, export metadata, timm's
    # pretrained_cfg). Students' inputs are re-normalised, channel-matched and resized for it.
    mean: list[float] | None = None
    std: list[Annotated[float, Field(gt=0.0)]] | None = None
    image_size: int | None = Field(None, ge=8)

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        given = [k for k in ("run", "file", "arch") if getattr(self, k) is not None]
        if given not in (["run"], ["file"], ["arch"], ["file", "arch"]):
            raise ValueError("name the teacher's source with exactly one of run (a run directory), file (a "
                             f"safetensors file, optionally with arch) or arch (a timm model name); got {given or 'none'}")
        return self


class TeacherPolicy(Strict):
    """Which teachers teach which peer at each step (METHODS §3.4).

    average: every teacher teaches every peer (KD averages logits or losses, see the kd term; feature terms
    average their per-teacher losses); round_robin: one teacher per step, in turn (MT-MTDA); assigned: each peer
    learns from the teacher named in `assign` (peer name -> teacher name).
    """

    mode: Literal["average", "round_robin", "assigned"] = "average"
    assign: dict[str, str] = {}


class TopologyConfig(Strict):
    kind: Literal["independent", "shared_stem"] = "independent"
    split: int = Field(1, ge=0)  # shared_stem: stages shared after the stem (CIFAR ResNet MCL-OKD: 1)
    stem_grad_scale: float = Field(1.0, gt=0.0)  # 1/P gives CL-ILR's backprop rescaling


class EmbeddingConfig(Strict):
    head: Literal["none", "linear", "mlp"] = "none"  # linear: MCL-OKD; mlp: MCL
    dim: int = Field(128, ge=1)
    hidden: int | None = Field(None, ge=1)  # mlp hidden width; None: the peer's pre-logits width


# ------------------------------------------------------------------------------------ objective
class Ramp(Strict):
    """Weight multiplier over training progress t (in epochs, fractional)."""

    shape: Literal["constant", "linear", "sigmoid"] = "constant"  # sigmoid: ONE's exp(-5(1-t/L)^2)
    epochs: float = Field(0.0, ge=0.0)  # ramp length L


class TermBase(Strict):
    weight: float = Field(1.0, ge=0.0)
    ramp: Ramp = Ramp()


class CETerm(TermBase):
    """Cross-entropy of every peer, summed over peers, mean over the batch."""

    name: Literal["ce"]
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class DMLTerm(TermBase):
    """DML: each peer's KL toward every other peer (METHODS §1.1); summed over peers."""

    name: Literal["dml"]
    T: float = Field(1.0, gt=0.0)
    reduction: Literal["mean", "sum"] = "mean"  # rho = 1/(P-1) ("mean", reconstructed) or 1 (official)


class DOTTerm(TermBase):
    """Ensemble distillation (MCL-OKD's DOT, METHODS §1.6): KD from the detached mean logits."""

    name: Literal["dot"]
    T: float = Field(3.0, gt=0.0)
    targets: Literal["last", "all"] = "last"  # which peers are distilled


class MCLTerm(TermBase):
    """MCL in-batch contrast (METHODS §1.7): VCL, ICL and their soft forms, over all ordered pairs."""

    name: Literal["mcl"]
    tau: float = Field(0.1, gt=0.0)
    T: float = Field(3.0, gt=0.0)  # soft-form temperature
    vcl: float = Field(0.1, ge=0.0)  # alpha
    icl: float = Field(0.1, ge=0.0)  # beta
    soft_vcl: float = Field(1.0, ge=0.0)  # gamma
    soft_icl: float = Field(1.0, ge=0.0)  # lambda
    pair_reduction: Literal["mean", "sum"] = "mean"  # rho = 1/(P-1) (Gap for P > 2) or 1
    icl_self_positive: bool = False
    soft_t2: bool = True  # the T^2 factor on the soft terms [reconstructed]
    global_batch: bool = True  # data-parallel: contrast over the all-gathered global batch


class MCLOKDTerm(TermBase):
    """MCL-OKD memory-bank NCE (METHODS §1.6): peer j's embedding against peer i's bank, i != j."""

    name: Literal["mcl_okd"]
    weight: float = Field(0.025, ge=0.0)  # beta, with pair_reduction "sum"
    tau: float = Field(0.1, gt=0.0)
    K: int = Field(256, ge=1)  # negatives per anchor, drawn from other classes
    momentum: float = Field(0.5, ge=0.0, lt=1.0)
    pair_reduction: Literal["sum", "mean"] = "sum"
    eps: float = Field(1e-7, gt=0.0)
    nce_global_norm: bool = True  # data-parallel: the normaliser's mean over all ranks


# ------------------------------------------------------------------- teacher -> peer terms (METHODS §2)
class TeacherTermBase(TermBase):
    """A loss from frozen offline teachers to every peer (summed over peers).

    `teacher`: the one teacher this term uses; None: the teachers `teacher_policy` picks for each peer and step.
    Taps are named as in the peer group (`stem`, `stage1..S`, `pre_logits`, `logits`, or `feature{i}`);
    `teacher_tap` None means the same name as the student's.
    """

    teacher: str | None = None


class KDTerm(TeacherTermBase):
    """Hinton KD (METHODS §2.1): T²·batchmean KL(softmax(sg(t)/T) ‖ softmax(z/T)); RepDistiller: CE 0.1 + KD 0.9."""

    name: Literal["kd"]
    weight: float = Field(0.9, ge=0.0)
    T: float = Field(4.0, gt=0.0)
    direction: Literal["forward", "reverse"] = "forward"  # reverse: KL(p_S ‖ p_T) (METHODS §3)
    average: Literal["logits", "loss"] = "logits"  # several teachers: KD to the mean logits, or mean of KD terms


class FitNetTerm(TeacherTermBase):
    """FitNets hint (METHODS §2.2): β·mean((r(F_S) − sg(F_T))²) with a trainable regressor r, β = 100."""

    name: Literal["fitnet"]
    weight: float = Field(100.0, ge=0.0)
    tap: str | None = None  # None: the middle stage, stage((S+1)//2) (RepDistiller hint_layer = 2)
    teacher_tap: str | None = None
    paper_form: bool = False  # [reconstructed] ½‖r(F_S) − F_T‖² summed per sample, batch mean


class ATTerm(TeacherTermBase):
    """Attention transfer (METHODS §2.3): β·Σ_l mean_{b,hw}(Q_S − Q_T)², β = 1000, every stage by default."""

    name: Literal["at"]
    weight: float = Field(1000.0, ge=0.0)
    taps: list[str] | None = None  # None: stage1..S
    teacher_taps: list[str] | None = None  # None: the names in `taps`, or the teacher's own stage1..S
    p: float = Field(2.0, gt=0.0)
    paper_norm: bool = False  # [reconstructed] (β/2)·‖Q_S − Q_T‖₂ per sample (not squared), batch mean


class FSPTerm(TeacherTermBase):
    """FSP (METHODS §2.4): λ·Σ_pairs mean(G_S − G_T)², λ = 50, G over consecutive taps (stem, stage1..S)."""

    name: Literal["fsp"]
    weight: float = Field(50.0, ge=0.0)
    taps: list[str] | None = None  # None: stem, stage1, ..., stageS; G for each consecutive pair
    teacher_taps: list[str] | None = None  # None: the names in `taps`, or the teacher's own stem, stage1..S
    adapter: Literal["none", "conv1x1"] = "none"  # Gap: none errors at build time when channels differ


class NSTTerm(TeacherTermBase):
    """Neuron selectivity transfer (METHODS §2.5): λ·mean_b MMD², λ = 50 (RepDistiller), last stage."""

    name: Literal["nst"]
    weight: float = Field(50.0, ge=0.0)
    tap: str | None = None  # None: the last stage
    teacher_tap: str | None = None
    kernel: Literal["poly", "linear", "gaussian"] = "poly"
    degree: int = Field(2, ge=1)
    c: float = 0.0


class RelationTerm(TeacherTermBase):
    """The relation framework (METHODS §2.6): w·ℓ(N(A(Z_S)), sg(N(A(Z_T)))) on one tap, B×B."""

    name: Literal["relation"]
    tap: str = "pre_logits"
    teacher_tap: str | None = None
    affinity: Literal["dot", "cosine", "euclidean", "gaussian"] = "cosine"
    normalisation: Literal["none", "row_l2", "mean", "row_l1", "row_softmax"] = "row_l1"
    loss: Literal["mse", "l1", "smooth_l1", "kl"] = "kl"
    tau: float = Field(1.0, gt=0.0)  # row_softmax temperature [reconstructed]
    gamma: float = Field(1.0, gt=0.0)  # gaussian affinity
    global_batch: bool = True  # data-parallel: relations over the all-gathered global batch (METHODS §0.5)


class SPTerm(TeacherTermBase):
    """Similarity preserving (METHODS §2.6): (dot, row_l2, mse) on the flattened last-stage map, weight 3000."""

    name: Literal["sp"]
    weight: float = Field(3000.0, ge=0.0)
    tap: str | None = None  # None: the last stage
    teacher_tap: str | None = None
    global_batch: bool = True  # data-parallel: relations over the all-gathered global batch (METHODS §0.5)


class RKDTerm(TeacherTermBase):
    """RKD (METHODS §2.6): distance_weight·RKD-D + angle_weight·RKD-A on the pooled embedding (RepDistiller 25, 50)."""

    name: Literal["rkd"]
    tap: str = "pre_logits"
    teacher_tap: str | None = None
    distance_weight: float = Field(25.0, ge=0.0)
    angle_weight: float = Field(50.0, ge=0.0)
    normalize: bool = False  # lenscloth/RKD's classification script L2-normalises the embeddings
    global_batch: bool = True  # data-parallel: relations over the all-gathered global batch (METHODS §0.5)


class PKTTerm(TeacherTermBase):
    """PKT (METHODS §2.6): (cosine, row_l1, kl) on the pooled embedding, weight 30000."""

    name: Literal["pkt"]
    weight: float = Field(30000.0, ge=0.0)
    tap: str = "pre_logits"
    teacher_tap: str | None = None
    global_batch: bool = True  # data-parallel: relations over the all-gathered global batch (METHODS §0.5)


class CCTerm(TeacherTermBase):
    """Correlation congruence (METHODS §2.6), `form` repdistiller (weight 0.02) or rbf_taylor (weight 100)."""

    name: Literal["cc"]
    weight: float | None = Field(None, ge=0.0)  # None: 0.02 (repdistiller) or 100 (rbf_taylor)
    form: Literal["repdistiller", "rbf_taylor"] = "repdistiller"
    tap: str = "pre_logits"
    teacher_tap: str | None = None
    embed_dim: int = Field(128, ge=1)  # repdistiller: trainable Linear embeddings on both sides [reconstructed]
    gamma: float = Field(0.4, gt=0.0)  # rbf_taylor
    order: int = Field(2, ge=0)  # rbf_taylor
    global_batch: bool = True  # data-parallel: relations over the all-gathered global batch (METHODS §0.5)

    @model_validator(mode="after")
    def _form_weight(self) -> CCTerm:
        if self.weight is None:
            self.weight = 0.02 if self.form == "repdistiller" else 100.0
        return self


class AdaINTerm(TeacherTermBase):
    """AdaIN statistics transfer (METHODS §2.7, reconstructed): weight = λ_ada on Σ_l L_AdaIN, plus
    feat_weight = λ_feat on the connector's FitNet-style loss at the last tap."""

    name: Literal["adain"]
    weight: float = Field(100.0, ge=0.0)
    feat_weight: float = Field(100.0, ge=0.0)
    taps: list[str] | None = None  # None: the last two stages
    teacher_taps: list[str] | None = None  # None: the names in `taps`, or the teacher's own last two stages
    head: Literal["next_stage", "logits"] = "next_stage"
    T: float = Field(4.0, gt=0.0)  # head=logits: KD temperature
    statistics_only: bool = False  # ablation baseline: mean ‖μ_S − μ_T‖² + ‖σ_S − σ_T‖² through the connector


class AMATerm(TeacherTermBase):
    """Activation-map adaptation (METHODS §2.8, reconstructed): a trainable M_φ replaces the teacher's stage k+1;
    the student matches A = M_φ(T_front(x)) through a regressor (weight λ = 100); M_φ learns CE(T_back(A), y)."""

    name: Literal["ama"]
    weight: float = Field(100.0, ge=0.0)
    stage: int | None = Field(None, ge=1)  # k: None = the middle stage; M_φ replaces teacher stage k+1
    width: Literal["student", "teacher"] = "student"  # M_φ's hidden width: the student's stage-(k+1) channels
    kernel_size: Literal[1, 3] = 3
    module_ce_weight: float = Field(1.0, ge=0.0)  # M_φ's CE through the frozen teacher remainder
    module_kd_weight: float = Field(0.0, ge=0.0)  # optional KD from the original teacher logits into T_back(A)
    T: float = Field(4.0, gt=0.0)


class DiscriminatorConfig(Strict):
    """Discriminators always have their own optimizer (METHODS §1.10 Gap: Adam 2e-4, β (0.5, 0.999), wd 0)."""

    lr: float = Field(2e-4, gt=0.0)
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field([0.5, 0.999], min_length=2, max_length=2)
    weight_decay: float = Field(0.0, ge=0.0)


class ComplementaryTerm(TeacherTermBase):
    """Complementary features (METHODS §2.9, reconstructed): alignment block A on the last stage;
    feature_weight·mean(A(E_S) − sg(E_T))² + adversarial_weight·BCE(D(A(E_S)), real), D alternating on its own."""

    name: Literal["complementary"]
    weight: float = Field(1.0, ge=0.0)
    feature_weight: float = Field(100.0, ge=0.0)  # λ_f
    adversarial_weight: float = Field(0.1, ge=0.0)  # λ_adv
    tap: str | None = None  # None: the last stage
    teacher_tap: str | None = None
    routing: Literal["single_teacher", "mktn"] = "single_teacher"
    feature_teacher: str | None = None  # mktn: the discriminative teacher (feature loss)
    adversarial_teacher: str | None = None  # mktn: the generative (reconstruction) teacher (adversarial loss)
    discriminator: DiscriminatorConfig = DiscriminatorConfig()


class ReconstructionTerm(TermBase):
    """Teacher-side reconstruction auxiliary (METHODS §2.9): λ_rec·mean(R(E(x)) − x)² with a light upsampling
    decoder R on a peer's tap; train a teacher with CE + this term (Gap: λ_rec = 1)."""

    name: Literal["reconstruction"]
    tap: str | None = None  # None: the last stage


class LWKDTerm(TeacherTermBase):
    """LW-KD (METHODS §2.10, reconstructed): targets t = softmax(T_lw(x̃_y)/τ) from a lightweight teacher trained
    on a synthetic dataset with the same classes; weight = α on τ²·KL(t ‖ p_S) + adversarial_weight·BCE(D(p_S), real)."""

    name: Literal["lwkd"]
    weight: float = Field(0.9, ge=0.0)  # α; give the ce term (1 − α) = 0.1
    T: float = Field(4.0, gt=0.0)  # τ
    adversarial_weight: float = Field(0.1, ge=0.0)
    hidden: int = Field(256, ge=1)  # discriminator MLP width
    discriminator: DiscriminatorConfig = DiscriminatorConfig()


Term = Annotated[
    Union[CETerm, DMLTerm, DOTTerm, MCLTerm, MCLOKDTerm, KDTerm, FitNetTerm, ATTerm, FSPTerm, NSTTerm, RelationTerm,
          SPTerm, RKDTerm, PKTTerm, CCTerm, AdaINTerm, AMATerm, ComplementaryTerm, ReconstructionTerm, LWKDTerm],
    Field(discriminator="name"),
]
TERM_NAMES = ("ce", "dml", "dot", "mcl", "mcl_okd", "kd", "fitnet", "at", "fsp", "nst", "relation", "sp", "rkd", "pkt",
              "cc", "adain", "ama", "complementary", "reconstruction", "lwkd")
EMBEDDING_TERMS = ("mcl", "mcl_okd")
TEACHER_TERMS = ("kd", "fitnet", "at", "fsp", "nst", "relation", "sp", "rkd", "pkt", "cc", "adain", "ama",
                 "complementary", "lwkd")
LOGIT_TEACHER_TERMS = ("kd", "lwkd")  # need only logits: they also work under placement=peer_parallel


class StageConfig(Strict):
    """One stage of multi-stage training: how many epochs, and which terms are active (by label)."""

    epochs: int = Field(ge=1)
    terms: list[str] = Field(min_length=1)  # term labels: the name, or name<i> when a name occurs twice


class ObjectiveConfig(Strict):
    terms: list[Term] = Field(
        default_factory=lambda: [CETerm(name="ce"), DMLTerm(name="dml")], min_length=1
    )
    # Multi-stage training (FitNets' hint stage, FSP's initialisation): empty = one stage with every term. The
    # stages' epochs must add up to train.epochs; the lr schedule runs over train.epochs as a whole.
    stages: list[StageConfig] = []

    @property
    def labels(self) -> list[str]:
        """Each term's label in logs and stage lists: its name, or name<i> when the name occurs more than once."""
        names = [t.name for t in self.terms]
        return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


# ------------------------------------------------------------------------------------- training
class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd
    nesterov: bool = True  # sgd
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field([0.9, 0.999], min_length=2, max_length=2)  # adamw
    weight_decay: float = Field(5e-4, ge=0.0)


class ScheduleConfig(Strict):
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)  # linear warm-up from warmup_start_factor x lr
    warmup_start_factor: float = Field(0.1, gt=0.0, le=1.0)
    period_epochs: float | None = Field(None, gt=0.0)  # cosine period; None: train.epochs
    min_lr: float = Field(0.0, ge=0.0)  # cosine floor
    milestones: list[float] = []  # step: epochs at which lr *= gamma
    gamma: float = Field(0.1, gt=0.0, le=1.0)


class TrainConfig(Strict):
    epochs: int = Field(12, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop (and checkpoint) after this many optimizer steps
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: float | None = Field(None, gt=0.0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False  # train on CPU even when a GPU is present
    compile: bool = False  # torch.compile the peer group's training forward (first steps pay the compile)
    deterministic: bool = True
    log_every: int = Field(10, ge=1)  # steps between metric lines
    collective_timeout_s: float = Field(300.0, gt=0.0)  # a rank that waits longer on the others fails
    progress: bool = True  # progress bar on the main process


class TrackingConfig(Strict):
    backend: Literal["none", "wandb", "tensorboard"] = "none"
    project: str = "mutualkd"
    run_name: str | None = None  # None: the run directory's name
    entity: str | None = None
    tags: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"backend": value} if isinstance(value, str) else value


class Config(Strict):
    seed: int = 0
    data: DataConfig = DataConfig()
    peers: list[PeerConfig] = Field(
        default_factory=lambda: [PeerConfig(arch="cifar_resnet8"), PeerConfig(arch="cifar_resnet8")],
        min_length=1,
    )
    topology: TopologyConfig = TopologyConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    teachers: list[TeacherConfig] = []
    teacher_policy: TeacherPolicy = TeacherPolicy()
    objective: ObjectiveConfig = ObjectiveConfig()
    train: TrainConfig = TrainConfig()
    placement: Literal["data_parallel", "peer_parallel"] = "data_parallel"
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("peers", "teachers")
    @classmethod
    def _names(cls, items: list, info) -> list:
        """Default names `peer{i}` / `teacher{i}`; names must be unique."""
        kind = info.field_name[:-1]
        seen = set()
        for i, item in enumerate(items):
            if item.name is None:
                item.name = f"{kind}{i}"
            if item.name in seen:
                raise ValueError(f"{info.field_name}.{i}.name: duplicate {kind} name {item.name!r}")
            seen.add(item.name)
        return items

    @model_validator(mode="after")
    def _teachers_fit(self) -> Config:
        names = [t.name for t in self.teachers]
        known = f"teachers: {', '.join(map(repr, names))}" if names else "the config has no teachers"
        for i, term in enumerate(self.objective.terms):
            key = f"objective.terms.{i}"
            if term.name not in TEACHER_TERMS:
                continue
            if not names:
                raise ValueError(f"{key} ({term.name}): a teacher term needs teachers; add a `teachers:` list")
            for field in ("teacher", "feature_teacher", "adversarial_teacher"):
                value = getattr(term, field, None)
                if value is not None and value not in names:
                    raise ValueError(f"{key}.{field}: unknown teacher {value!r}; {known}")
            if self.placement == "peer_parallel" and term.name not in LOGIT_TEACHER_TERMS:
                raise ValueError(f"{key} ({term.name}): feature terms need every peer's taps in one process; "
                                 "use placement=data_parallel (kd and lwkd work under peer_parallel)")
        policy = self.teacher_policy
        if policy.mode == "assigned":
            for peer in self.peer_names:
                if peer not in policy.assign:
                    raise ValueError(f"teacher_policy.assign: peer {peer!r} has no teacher (mode assigned needs one "
                                     f"per peer: {', '.join(self.peer_names)})")
        for peer, teacher in policy.assign.items():
            if peer not in self.peer_names:
                raise ValueError(f"teacher_policy.assign: unknown peer {peer!r}; peers: {', '.join(self.peer_names)}")
            if teacher not in names:
                raise ValueError(f"teacher_policy.assign.{peer}: unknown teacher {teacher!r}; {known}")
        if self.teachers and self.data.views == "per_peer":
            raise ValueError("data.views: per_peer views are not supported with teachers (a teacher sees one view "
                             "per batch); use data.views=shared")
        stages, labels = self.objective.stages, self.objective.labels
        if stages:
            total = sum(s.epochs for s in stages)
            if total != self.train.epochs:
                raise ValueError(f"objective.stages: the stages' epochs add up to {total}, train.epochs is "
                                 f"{self.train.epochs}; they must be equal")
            for i, stage in enumerate(stages):
                for label in stage.terms:
                    if label not in labels:
                        raise ValueError(f"objective.stages.{i}.terms: unknown term {label!r}; terms: {', '.join(labels)}")
        return self

    @model_validator(mode="after")
    def _heads_are_used(self) -> Config:
        uses = [t.name for t in self.objective.terms if t.name in EMBEDDING_TERMS]
        if self.embedding.head != "none" and not uses:
            raise ValueError(f"embedding.head: {self.embedding.head!r} heads would be trained by nothing; no term in "
                             f"objective.terms uses embeddings ({', '.join(EMBEDDING_TERMS)}); set embedding.head=none")
        if self.placement == "peer_parallel" and self.train.mixed_precision == "fp16":
            raise ValueError("train.mixed_precision: fp16 is not supported with placement=peer_parallel "
                             "(each rank would skip overflowing steps on its own); use bf16")
        return self

    @property
    def peer_names(self) -> list[str]:
        return [p.name for p in self.peers]


# ------------------------------------------------------------------------------ loading, overrides
class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `1e-3` and `5e4` as floats (YAML 1.1 wants a dot: `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> dict:
    """Read a config file as a mapping; any failure is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = _parse(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise UserError(f"{path}: unreadable YAML{line}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(tree: dict, item: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (`2`, `true`, `[a, b]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r}: expected dotted.key=value")
    try:
        value = _parse(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise UserError(f"override {key}: {'.'.join(parts[:depth])} is a list; expected an index, got {part!r}")
            idx = int(part)
            if idx > len(node):
                raise UserError(f"override {key}: index {idx} out of range ({'.'.join(parts[:depth])} has {len(node)} entries)")
            if idx == len(node):  # `peers.2.arch=x` on a two-peer config appends a peer
                node.append({})
            if last:
                node[idx] = value
            else:
                if not isinstance(node[idx], (dict, list)):
                    raise UserError(f"override {key}: {where} is a value, not a section")
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = _default_section(parts[: depth + 1])
                if not isinstance(child, (dict, list)):
                    raise UserError(f"override {key}: {where} is a value, not a section")
                node = child
        else:
            raise UserError(f"override {key}: {where} is a value, not a section")


def _default_section(parts: list[str]) -> Any:
    """The schema default of a section an override reaches into (so `peers.0.arch=x` edits the defaults)."""
    node: Any = Config().model_dump(mode="python")
    for part in parts:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError):
            return {}
    return node if isinstance(node, (dict, list)) else {}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from an optional YAML file plus dotted overrides."""
    tree = read_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(tree, item)
    return validate(tree, source=str(path) if path else "config")


def validate(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"{source}: {_describe(err.errors()[0])}") from None


def _describe(error: dict) -> str:
    """One line naming the key, what is allowed, and what was given."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and p in TERM_NAMES + ("function-after",))]
    # pydantic puts the union tag after a list index; drop it so the key reads objective.terms.1.T
    key = ".".join(str(p) for p in loc) or "<top level>"
    kind, msg, given = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        dym = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{key}: unknown key{dym}; allowed keys: {', '.join(allowed)}"
    if kind == "union_tag_invalid":
        return f"{key}.name: unknown term {given.get('name')!r}; expected one of {', '.join(map(repr, TERM_NAMES))}"
    if kind == "union_tag_not_found":
        return f"{key}: a term needs a name; expected one of {', '.join(map(repr, TERM_NAMES))}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if not loc or msg.startswith(str(loc[0])) else f"{key}: {msg}"
    return f"{key}: {msg[0].lower() + msg[1:]} (got {given!r})"


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the schema section at `loc` (used to list the allowed keys in an error)."""
    model: Any = Config
    terms = {t.model_fields["name"].annotation.__args__[0]: t for t in Term.__origin__.__args__}
    for part in loc:
        if isinstance(part, int):
            continue
        if part in terms:
            model = terms[part]
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return sorted(model.model_fields)


def dump(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory keeps)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
