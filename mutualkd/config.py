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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mutualkd.errors import UserError

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


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


class DataConfig(Strict):
    name: Literal["digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
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


# -------------------------------------------------------------------------------------------- peers
class PeerConfig(Strict):
    arch: str  # any timm model name, or one of mutualkd's CIFAR zoo
    name: str | None = None  # default "peer{i}"
    pretrained: bool = False  # timm hub weights; needs network unless cached
    model_kwargs: dict[str, int | float | bool | str] = {}  # passed to timm.create_model


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


Term = Annotated[Union[CETerm, DMLTerm, DOTTerm, MCLTerm, MCLOKDTerm], Field(discriminator="name")]
TERM_NAMES = ("ce", "dml", "dot", "mcl", "mcl_okd")
EMBEDDING_TERMS = ("mcl", "mcl_okd")


class ObjectiveConfig(Strict):
    terms: list[Term] = Field(
        default_factory=lambda: [CETerm(name="ce"), DMLTerm(name="dml")], min_length=1
    )


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
    objective: ObjectiveConfig = ObjectiveConfig()
    train: TrainConfig = TrainConfig()
    placement: Literal["data_parallel", "peer_parallel"] = "data_parallel"
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("peers")
    @classmethod
    def _names(cls, peers: list[PeerConfig]) -> list[PeerConfig]:
        seen = set()
        for i, p in enumerate(peers):
            if p.name is None:
                p.name = f"peer{i}"
            if p.name in seen:
                raise ValueError(f"peers.{i}.name: duplicate peer name {p.name!r}")
            seen.add(p.name)
        return peers

    @model_validator(mode="after")
    def _heads_are_used(self) -> "Config":
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
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: plain data only


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
        return msg.removeprefix("Value error, ")
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
