"""Typed configuration: YAML + dotted overrides -> a validated `Config`; every default lives here.

The schema defaults ARE the quickstart run (digits, two peers, CE + DML), so `mutualkd train` with no
arguments needs no file; `configs/quickstart.yaml` spells the same values out. Every mistake a user can
make surfaces as one `UserError` line naming the key, before anything is built.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from mutualkd.errors import UserError


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

    @field_validator("image_size")
    @classmethod
    def _fits(cls, size: int, info) -> int:
        if info.data.get("num_classes", 10) > 10 and size < 16:
            raise ValueError(f"two-digit classes (num_classes > 10) need image_size >= 16, got {size}")
        return size


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
                             "safetensors file, optionally with arch) or arch (a timm model name); "
                             f"got {given or 'none'}")
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


class TermConfig(Strict):
    """Base of every term's config schema. Each term's module declares its own subclass (with
    `name: Literal["<name>"] = "<name>"`) and registers it with the term (`mutualkd.registry`); the weight is
    quoted with the term's reduction (METHODS.md §0.2)."""

    name: str
    weight: float = Field(1.0, ge=0.0)
    ramp: Ramp = Ramp()

    teacher_fields: ClassVar[tuple[str, ...]] = ()  # fields that name a teacher of `teachers:`

    def check(self, cfg: Config, key: str) -> None:
        """Cross-checks against the whole config, at validation time; raise ValueError("<key>...: why")."""

    @property
    def updates_peers_in_turn(self) -> bool:
        """True when a step updates the peers one after another (each update reaching only some parameters)."""
        return False


def _term_config(value: Any) -> Any:
    """A raw term mapping -> the registered schema of its `name` (the union of `objective.terms`)."""
    if not isinstance(value, dict):
        return value
    from mutualkd.registry import TERMS

    names = ", ".join(map(repr, TERMS.names()))
    name = value.get("name")
    if name is None:
        raise PydanticCustomError("term_name_missing", "a term needs a name; expected one of {names}", {"names": names})
    spec = TERMS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise PydanticCustomError("unknown_term", "unknown term {name}; expected one of {names} (a plugin's term? "
                                  "load it with --plugin FILE)", {"name": repr(name), "names": names})
    return spec.config.model_validate(value)


TermItem = SerializeAsAny[Annotated[TermConfig, BeforeValidator(_term_config)]]


def _default_terms() -> list[TermConfig]:
    from mutualkd.registry import TERMS

    return [TERMS.get("ce").config(), TERMS.get("dml").config()]


class StageConfig(Strict):
    """One stage of multi-stage training: how many epochs, and which terms are active (by label)."""

    epochs: int = Field(ge=1)
    terms: list[str] = Field(min_length=1)  # term labels: the name, or name<i> when a name occurs twice


class ObjectiveConfig(Strict):
    terms: list[TermItem] = Field(default_factory=_default_terms, min_length=1)
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
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)  # lazily: its terms come from the registry
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
    def _terms_fit(self) -> Config:
        """What each term needs (from the registry) against the rest of the config, then its own checks."""
        from mutualkd.registry import TERMS

        names = [t.name for t in self.teachers]
        known = f"teachers: {', '.join(map(repr, names))}" if names else "the config has no teachers"
        for i, term in enumerate(self.objective.terms):
            key, kind = f"objective.terms.{i}", TERMS.get(term.name).term
            if kind.needs_teacher and not names:
                raise ValueError(f"{key} ({term.name}): a teacher term needs teachers; add a `teachers:` list")
            for field in term.teacher_fields:
                value = getattr(term, field)
                if value is not None and value not in names:
                    raise ValueError(f"{key}.{field}: unknown teacher {value!r}; {known}")
            if self.placement == "peer_parallel" and not kind.peer_parallel:
                fits = ", ".join(s.name for s in TERMS.specs() if s.term.peer_parallel)
                raise ValueError(f"{key} ({term.name}): feature terms need every peer's taps in one process; "
                                 f"use placement=data_parallel (these work under peer_parallel: {fits})")
            term.check(self, key)
        uses = [t.name for t in self.objective.terms if TERMS.get(t.name).term.needs_embeddings]
        if self.embedding.head != "none" and not uses:
            readers = ", ".join(s.name for s in TERMS.specs() if s.term.needs_embeddings)
            raise ValueError(f"embedding.head: {self.embedding.head!r} heads would be trained by nothing; no term in "
                             f"objective.terms uses embeddings ({readers}); set embedding.head=none")
        return self

    @model_validator(mode="after")
    def _teachers_and_stages_fit(self) -> Config:
        names = [t.name for t in self.teachers]
        known = f"teachers: {', '.join(map(repr, names))}" if names else "the config has no teachers"
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
                        raise ValueError(f"objective.stages.{i}.terms: unknown term {label!r}; "
                                         f"terms: {', '.join(labels)}")
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
                raise UserError(f"override {key}: index {idx} out of range ({'.'.join(parts[:depth])} has "
                                f"{len(node)} entries)")
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


def resolve_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping, with its `base:` chain merged in: `base` names another config (relative to
    this file) whose mapping this one overrides key by key, recursively; lists and values are replaced whole."""
    path = Path(path)
    tree = read_yaml(path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base: expected the path of another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _chain or base_path == path.resolve():
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve(), base_path))
        raise UserError(f"{path}: base: the configs name each other in a cycle ({cycle})")
    if not base_path.is_file():
        raise UserError(f"{path}: base: config file not found: {base_path}")
    return _merge(resolve_yaml(base_path, (*_chain, path.resolve())), tree)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a validated Config from an optional YAML file (with its `base:` chain) plus dotted overrides."""
    tree = resolve_yaml(path) if path is not None else {}
    for item in overrides:
        apply_override(tree, item)
    return validate(tree, source=str(path) if path else "config")


def validate(tree: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"{source}: {_describe(err.errors()[0], tree)}") from None


def _describe(error: dict, tree: dict) -> str:
    """One line naming the key, what is allowed, and what was given."""
    loc = [p for p in error["loc"] if p != "function-after"]
    key = ".".join(str(p) for p in loc) or "<top level>"
    kind, msg, given = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1], tree)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        dym = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{key}: unknown key{dym}; allowed keys: {', '.join(allowed)}"
    if kind == "unknown_term":
        return f"{key}.name: {msg}"
    if kind == "missing":
        return f"{key}: required key is missing"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if not loc or msg.startswith(str(loc[0])) else f"{key}: {msg}"
    if kind == "term_name_missing":
        return f"{key}: {msg}"
    return f"{key}: {msg[0].lower() + msg[1:]} (got {given!r})"


def _allowed_keys(loc: tuple, tree: Any) -> list[str]:
    """Field names of the schema section at `loc` (used to list the allowed keys in an error); a term's section
    is the schema registered for the name the input gives it."""
    from mutualkd.registry import TERMS

    model: Any = Config
    node, in_terms = tree, False
    for part in loc:
        node = node[part] if isinstance(node, (dict, list)) and _has(node, part) else None
        if isinstance(part, int):
            if in_terms:
                spec = TERMS.get(node.get("name")) if isinstance(node, dict) else None
                model, in_terms = (spec.config if spec else TermConfig), False
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        in_terms = field is ObjectiveConfig.model_fields["terms"]
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return sorted(k for k in model.model_fields)


def _has(node: dict | list, part: Any) -> bool:
    return part in node if isinstance(node, dict) else isinstance(part, int) and 0 <= part < len(node)


def dump(cfg: Config) -> str:
    """The resolved config as YAML (what a run directory keeps)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
