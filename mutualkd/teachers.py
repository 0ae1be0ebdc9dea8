"""Frozen offline teachers (METHODS.md §2): loaded, re-normalised, run in eval mode under no_grad.

A teacher comes from a mutualkd run directory (a one-peer run is a teacher run), a safetensors file (a
`mutualkd export`, or any timm weights plus `arch`), or a timm model name. It is wrapped in a one-peer
`PeerGroup`, so it has the same taps (`stem`, `stage1..S`, `pre_logits`, `logits`, `feature{i}`) and
dry-run tap shapes as the students. Teachers are never prepared by Accelerate, never in an optimizer and
never checkpointed: a run records where they came from in its config.

`TeacherSet` applies the multi-teacher policy (which teachers teach which peer at a step) and runs only the
teachers a step needs, with only the taps the objective asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mutualkd import config as C
from mutualkd.data import DataSpec
from mutualkd.errors import UserError, first_line


@dataclass
class InputSpec:
    """The input a network expects: channels, (H, W), per-channel mean and std of [0, 1] pixels."""

    in_chans: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class TeacherOutput:
    """One step's teacher results: per teacher index that ran, its logits and requested taps."""

    assignment: list[list[int]]  # per peer (global order): the teachers that teach it at this step
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher index -> [B, C_t]
    taps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


class Teacher(nn.Module):
    """One frozen network with its input transform. `forward` takes the students' normalised batch."""

    def __init__(self, name: str, model: nn.Module, arch: str, num_classes: int, spec: InputSpec,
                 students: InputSpec, data_cfg: C.DataConfig | None = None):
        from mutualkd.peers import PeerGroup

        super().__init__()
        self.name, self.arch, self.num_classes, self.spec = name, arch, num_classes, spec
        self.data_cfg = data_cfg  # the dataset a run-directory teacher was trained on (LW-KD draws from it)
        holder = C.Config(peers=[C.PeerConfig(arch=arch, name=name)])
        self.net = PeerGroup(holder, num_classes, spec.in_chans, spec.image_size, models=[model])
        self.net.requires_grad_(False)
        self.eval()
        self.tap_shapes = self.net.tap_shapes[0]
        self._set_transform(students)
        self._pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # images, counts, starts

    def _set_transform(self, s: InputSpec) -> None:
        t = self.spec
        if s.in_chans != t.in_chans and 1 not in (s.in_chans, t.in_chans):
            raise UserError(f"teachers ({self.name}): expects {t.in_chans}-channel input, the students get "
                            f"{s.in_chans} channels; only 1 <-> 3 channels can be converted")
        self.channels = (s.in_chans, t.in_chans)
        self.resize = None if tuple(s.image_size) == tuple(t.image_size) else tuple(t.image_size)
        self.identity = s == t
        self.register_buffer("s_mean", torch.tensor(s.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("s_std", torch.tensor(s.std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_mean", torch.tensor(t.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("t_std", torch.tensor(t.std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        """A teacher stays in eval mode (frozen BatchNorm statistics, no dropout) whatever its owner does."""
        return super().train(False)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Students' normalised input -> this teacher's input: un-normalise, match channels, resize, normalise."""
        if self.identity:
            return x
        raw = x.float() * self.s_std + self.s_mean
        s_ch, t_ch = self.channels
        if s_ch == 1 and t_ch == 3:
            raw = raw.expand(-1, 3, -1, -1)
        elif s_ch == 3 and t_ch == 1:
            raw = raw.mean(dim=1, keepdim=True)
        if self.resize is not None:
            raw = F.interpolate(raw, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        return (raw - self.t_mean) / self.t_std

    @torch.no_grad()
    def forward(self, x: torch.Tensor, taps=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits [B, C_t], requested taps) for the students' normalised batch `x`."""
        out = self.net(self.adapt(x), taps=taps)
        return out.logits[0], out.taps[0]

    # --------------------------------------------------------------- partial forwards (AdaIN, activation maps)
    def plan(self) -> list[tuple[str, str | None]]:
        plan = self.net.plans[0]
        if plan is None:
            raise UserError(f"teachers ({self.name}): {self.arch!r} has no stem/stages layout, so it cannot be run "
                            "from an inner tap (needed by adain and ama); use a CIFAR-zoo, ResNet or ConvNeXt teacher")
        return plan

    def remainder(self, tap: str, x: torch.Tensor, until: str = "logits") -> torch.Tensor:
        """Run the frozen teacher from the output of `tap` on `x`: to the next stage tap (`until="next_stage"`)
        or to the logits. Parameters stay frozen; `x` keeps its gradient (no no_grad here)."""
        plan = self.plan()
        labels = [label for _, label in plan]
        if tap not in labels:
            raise UserError(f"teachers ({self.name}): no tap {tap!r} to run from; "
                            f"taps: {', '.join(filter(None, labels))}")
        model = self.net.peers[0]
        for name, label in plan[labels.index(tap) + 1:]:
            x = model.get_submodule(name)(x)
            if until == "next_stage" and label is not None:
                return x
        if until == "next_stage":
            raise UserError(f"teachers ({self.name}): {tap!r} is the last stage; there is no next stage to run")
        return model.forward_head(x)

    def next_tap(self, tap: str) -> str | None:
        """The stage tap after `tap`, or None if `tap` is the last one."""
        labels = [label for _, label in self.plan() if label]
        i = labels.index(tap)
        return labels[i + 1] if i + 1 < len(labels) else None

    # ----------------------------------------------------------------------- label-conditioned (LW-KD)
    @torch.no_grad()
    def from_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits on one random training image of each label in `y` (redrawn every call), from the dataset
        this teacher was trained on: the teacher never sees the students' input (LW-KD, METHODS §2.10)."""
        if self._pool is None:
            self._pool = self._load_pool(y.device)
        images, counts, starts = self._pool
        u = torch.rand(y.shape, device=y.device, generator=generator)
        pick = starts[y] + (u * counts[y]).long().clamp_max(counts[y] - 1)
        x = (images[pick].float() / 255.0 - self.t_mean) / self.t_std
        return self.net(x).logits[0]

    def _load_pool(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This teacher's training images sorted by class, with per-class counts and start offsets."""
        from mutualkd.data import ImageTensors, load_splits

        d = self.data_cfg
        if d is None:
            raise UserError(f"teachers ({self.name}): drawing targets from labels needs a teacher trained with "
                            "mutualkd (a `run:` directory), whose training set it samples")
        splits = load_splits(d, download=False)  # never fetch at run time for a teacher
        if not isinstance(splits.train, ImageTensors):
            raise UserError(f"teachers ({self.name}): its dataset {d.name!r} is not held in memory; LW-KD needs one")
        targets = splits.train.targets
        counts = torch.bincount(targets, minlength=self.num_classes)
        if len(counts) > self.num_classes or bool((counts == 0).any()):
            raise UserError(f"teachers ({self.name}): its training set must hold every one of its "
                            f"{self.num_classes} classes")
        order = torch.argsort(targets, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        return splits.train.images[order].to(device), counts.to(device), starts.to(device)


def _peer_index(value: int | str, names: list[str], where: str) -> int:
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise UserError(f"{where}.peer: {value!r} is not a peer of that run; peers: "
                    + ", ".join(f"{i} ({n})" for i, n in enumerate(names)))


def _from_run(t: C.TeacherConfig, where: str):
    from mutualkd.runs import group_from_state

    cfg, state, group = group_from_state(Path(t.run), t.checkpoint)
    k = _peer_index(t.peer, cfg.peer_names, where)
    spec = state["data_spec"]
    inputs = InputSpec(spec["in_chans"], tuple(spec["image_size"]), tuple(spec["mean"]), tuple(spec["std"]))
    return group.peer_model(k), group.archs[k], spec["num_classes"], inputs, cfg.data


def _channels_and_kwargs(t: C.TeacherConfig, default: int) -> tuple[int, dict]:
    """(input channels: `model_kwargs.in_chans` or `default`, the other model kwargs)."""
    kwargs = dict(t.model_kwargs)
    return int(kwargs.pop("in_chans", default)), kwargs


def _from_file(t: C.TeacherConfig, where: str, num_classes: int, students: InputSpec):
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from mutualkd.peers import check_arch, create_peer

    path = Path(t.file)
    if not path.is_file():
        raise UserError(f"{where}.file: not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{where}.file: {path} is not a readable safetensors file ({first_line(err)})") from None
    arch = t.arch or meta.get("arch")
    if arch is None:
        raise UserError(f"{where}.arch: {path} does not say its architecture (not a mutualkd export); set arch")
    check_arch(arch, f"{where}.arch")
    pcfg = json.loads(meta["pretrained_cfg"]) if "pretrained_cfg" in meta else {}
    classes = t.num_classes or pcfg.get("num_classes") or num_classes
    in_chans, kwargs = _channels_and_kwargs(t, pcfg["input_size"][0] if "input_size" in pcfg else students.in_chans)
    model = create_peer(arch, classes, in_chans, **kwargs)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise UserError(f"{where}.file: {path} does not fit {arch!r} with {classes} classes and {in_chans} input "
                        f"channels ({first_line(err, 200)})") from None
    size = tuple(pcfg["input_size"][1:]) if "input_size" in pcfg else students.image_size
    inputs = InputSpec(in_chans, size, tuple(pcfg.get("mean", students.mean)), tuple(pcfg.get("std", students.std)))
    return model, arch, classes, inputs, None


def _from_arch(t: C.TeacherConfig, where: str, num_classes: int, students: InputSpec):
    from mutualkd.peers import check_arch, create_peer

    check_arch(t.arch, f"{where}.arch")
    in_chans, kwargs = _channels_and_kwargs(t, 3 if t.pretrained else students.in_chans)
    classes = t.num_classes or (None if t.pretrained else num_classes)  # pretrained: keep the hub head
    model = create_peer(t.arch, classes, in_chans, t.pretrained, **kwargs)
    if t.pretrained:
        mean, std = tuple(model.pretrained_cfg["mean"]), tuple(model.pretrained_cfg["std"])
    else:  # random weights: the students' normalisation, channel-matched
        mean, std = (students.mean, students.std) if in_chans == students.in_chans else (
            (sum(students.mean) / len(students.mean),) * in_chans, (sum(students.std) / len(students.std),) * in_chans)
    inputs = InputSpec(in_chans, students.image_size, mean, std)
    return model, t.arch, model.num_classes, inputs, None


def load_teacher(t: C.TeacherConfig, i: int, spec: DataSpec) -> Teacher:
    """Build teacher `i` of the config for students trained on data described by `spec`."""
    where = f"teachers.{i}"
    students = InputSpec(spec.in_chans, tuple(spec.image_size), tuple(spec.mean), tuple(spec.std))
    if t.run is not None:
        model, arch, classes, inputs, data_cfg = _from_run(t, where)
    elif t.file is not None:
        model, arch, classes, inputs, data_cfg = _from_file(t, where, spec.num_classes, students)
    else:
        model, arch, classes, inputs, data_cfg = _from_arch(t, where, spec.num_classes, students)
    if t.mean is not None or t.std is not None or t.image_size is not None:
        mean = tuple(t.mean) if t.mean is not None else inputs.mean
        std = tuple(t.std) if t.std is not None else inputs.std
        if len(mean) != inputs.in_chans or len(std) != inputs.in_chans:
            raise UserError(f"{where}.mean/std: {len(mean)}/{len(std)} values for a {inputs.in_chans}-channel teacher")
        size = (t.image_size, t.image_size) if t.image_size else inputs.image_size
        inputs = InputSpec(inputs.in_chans, size, mean, std)
    return Teacher(t.name, model, arch, classes, inputs, students, data_cfg)


class TeacherSet(nn.Module):
    """Every configured teacher plus the policy that assigns them to peers at each step."""

    def __init__(self, cfg: C.Config, spec: DataSpec):
        super().__init__()
        self.teachers = nn.ModuleList(load_teacher(t, i, spec) for i, t in enumerate(cfg.teachers))
        self.names = [t.name for t in cfg.teachers]
        self.mode = cfg.teacher_policy.mode
        self.assigned = [self.names.index(cfg.teacher_policy.assign[p]) if self.mode == "assigned" else None
                         for p in cfg.peer_names]
        self.num_peers = len(cfg.peers)

    def __len__(self) -> int:
        return len(self.teachers)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def candidates(self, peer: int) -> list[int]:
        """Every teacher that may teach `peer` at some step under the policy (adapters are built for these)."""
        return [self.assigned[peer]] if self.mode == "assigned" else list(range(len(self)))

    def assignment(self, step: int) -> list[list[int]]:
        """Per peer, the teachers that teach it at optimizer step `step`."""
        if self.mode == "round_robin":
            return [[step % len(self)]] * self.num_peers
        return [self.candidates(p) for p in range(self.num_peers)]

    def forward(self, x: torch.Tensor, step: int, wants: dict[int, set[str]]) -> TeacherOutput:
        """Run the teachers in `wants` (teacher index -> taps) on the students' batch `x`."""
        out = TeacherOutput(self.assignment(step))
        for t, taps in sorted(wants.items()):
            out.logits[t], out.taps[t] = self.teachers[t](x, taps=taps)
        return out
