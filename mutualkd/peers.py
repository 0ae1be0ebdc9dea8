"""The peer group: P students built with `timm.create_model`, run together, returning one `GroupOutput`.

Topologies (METHODS.md §0.5):
- `independent`: P separate, possibly heterogeneous networks.
- `shared_stem`: the stem and the first `split` stages are shared (one set of weights, computed once per
  input); each branch owns the remaining stages, its classifier and its head. Branch models alias the
  shared modules, so `peer_model(p)` is a complete network that exports and evaluates on its own.

Projection heads live here, not in the backbones, so they are trained and checkpointed but never exported.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn

import mutualkd.models  # noqa: F401  (registers the CIFAR zoo in timm's registry)
from mutualkd.config import Config, EmbeddingConfig
from mutualkd.errors import UserError, first_line


@dataclass
class GroupOutput:
    """What one forward of the group gives the objective."""

    logits: torch.Tensor  # [P, B, C]
    pre_logits: list[torch.Tensor]  # per peer [B, D_p] (widths may differ)
    embeddings: torch.Tensor | None = None  # [P, B, d], unit rows; None without heads
    taps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per peer: tap name -> tensor
    derived: dict = field(default_factory=dict, repr=False)  # memo of quantities computed from this output

    def memo(self, key, compute):
        """`compute()` once per forward: a quantity derived from this output (a term's adapted features) that
        several readers share, e.g. a term's update phase and its loss."""
        if key not in self.derived:
            self.derived[key] = compute()
        return self.derived[key]


def stage_layout(model: nn.Module) -> tuple[list[str], list[str], list[str]] | None:
    """Submodule names of (stem, stages, post-stage norm) in forward order, or None if unknown.

    Covers mutualkd's zoo and timm families built as stem/stages/norm_pre (ConvNeXt, CSPNet, ...) and
    timm's ResNets (conv1..maxpool, layer1..4). A name-based guess: `probe_peer` confirms it.
    """
    if hasattr(model, "stem") and isinstance(getattr(model, "stages", None), nn.Sequential):
        post = ["norm_pre"] if hasattr(model, "norm_pre") else []
        return ["stem"], [f"stages.{i}" for i in range(len(model.stages))], post
    if all(hasattr(model, n) for n in ("conv1", "bn1", "layer1")):
        stem = [n for n in ("conv1", "bn1", "act1", "maxpool") if hasattr(model, n)]
        stages = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
        return stem, stages, []
    return None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


Plan = list[tuple[str, str | None]]  # (submodule name, tap label after it)


def forward_plan(layout: tuple[list[str], list[str], list[str]]) -> Plan:
    """The forward as a list of submodules, labelling the taps `stem` and `stage1..S`."""
    stem, stages, post = layout
    return (
        [(n, "stem" if i == len(stem) - 1 else None) for i, n in enumerate(stem)]
        + [(n, f"stage{i + 1}") for i, n in enumerate(stages)]
        + [(n, None) for n in post]
    )


def _run(model: nn.Module, plan: Plan, x: torch.Tensor, want: set, taps: dict) -> torch.Tensor:
    for name, label in plan:
        x = model.get_submodule(name)(x)
        if label in want:
            taps[label] = x
    return x


def _same(fn, ref: torch.Tensor) -> bool:
    try:
        got = fn()
    except Exception:  # a wrong guess may fail on shapes anywhere inside
        return False
    return got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def probe_peer(model: nn.Module, plan: Plan | None, in_chans: int, image_size: tuple[int, int]) -> tuple[bool, bool]:
    """On a fixed random probe in eval mode: (does `plan` reproduce `forward_features`, does the classifier
    applied to `forward_head(pre_logits=True)` reproduce `forward_head`).

    `stage_layout` goes by attribute names only; families with more after the stages (ResNetV2's norm,
    NFNet's final_conv, FastViT, HRNet, ...) must not be run by a plan that skips those modules. Heads with a
    1x1-conv classifier before the flatten (ResNetV2, DPN) cannot take the pooled pre-logits directly.
    """
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, in_chans, *image_size, generator=torch.Generator().manual_seed(0))
        feats = model.forward_features(x)
        plan_ok = plan is not None and _same(lambda: _run(model, plan, x, set(), {}), feats)
        head_ok = _same(
            lambda: model.get_classifier()(model.forward_head(feats, pre_logits=True)), model.forward_head(feats)
        )
        return plan_ok, head_ok
    finally:
        model.train(was_training)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (CL-ILR's stem rescaling)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def make_head(kind: str, width: int, cfg: EmbeddingConfig) -> nn.Module:
    if kind == "linear":
        return nn.Linear(width, cfg.dim)
    hidden = cfg.hidden or width
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cfg.dim))


def _seeded(seed: int, key: int, make):
    """`make()` under its own RNG stream from (seed, key): a peer's initial weights do not depend on which other
    peers this process builds (peer-parallel placement) and leave the global stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + key)
        return make()


def create_peer(arch: str, num_classes: int | None, in_chans: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model` with clean errors; `num_classes=None` keeps the model's (or the hub weights') head."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(arch, pretrained=pretrained, in_chans=in_chans, **kwargs)
    except TypeError as err:
        raise UserError(f"peers: cannot create {arch!r} with {kwargs}: {err}") from None
    except Exception as err:  # hub or file errors behind pretrained=True
        if not pretrained:
            raise
        raise UserError(f"peers: pretrained weights for {arch!r} could not be loaded ({first_line(err, 200)}); "
                        "they need hub access or a local cache (HF_HUB_OFFLINE is set in tests)") from None


def check_arch(arch: str, key: str) -> None:
    if not timm.is_model(arch):
        import difflib

        near = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else "; see timm.list_models()"
        raise UserError(f"{key}: unknown model {arch!r} (not a timm or mutualkd model){hint}")


_PEER_KEY = re.compile(r"^(peers|heads)\.(\d+)\.")


def _reindex(key: str, mapping) -> str:
    """Rename `peers.<i>.` / `heads.<i>.` to `<prefix>.<mapping[i]>.`."""
    m = _PEER_KEY.match(key)
    return key if m is None else f"{m.group(1)}.{mapping[int(m.group(2))]}.{key[m.end():]}"


class PeerGroup(nn.Module):
    """P student networks plus their optional projection heads, run by one `forward`."""

    def __init__(self, cfg: Config, num_classes: int, in_chans: int, image_size: tuple[int, int],
                 local: list[int] | None = None, models: list[nn.Module] | None = None):
        """`local`: the global indices of the peers this process builds (peer-parallel placement); all by default.
        `models`: already built networks for the chosen peers (teachers), instead of creating them from `arch`."""
        super().__init__()
        for i, p in enumerate(cfg.peers):
            check_arch(p.arch, f"peers.{i}.arch")
        self.index = list(range(len(cfg.peers))) if local is None else list(local)
        if len(self.index) < len(cfg.peers) and cfg.topology.kind != "independent":
            raise UserError("placement: peer_parallel needs topology.kind=independent (a shared stem is one network)")
        chosen = [cfg.peers[i] for i in self.index]
        self.names = [p.name for p in chosen]
        self.archs = [p.arch for p in chosen]
        self.stem_grad_scale = cfg.topology.stem_grad_scale
        self.peers = nn.ModuleList(models if models is not None else (
            _seeded(cfg.seed, i, lambda p=p: create_peer(p.arch, num_classes, in_chans, p.pretrained, **p.model_kwargs))
            for i, p in zip(self.index, chosen)
        ))
        layouts = [stage_layout(m) for m in self.peers]
        probes = [
            probe_peer(m, forward_plan(lay) if lay else None, in_chans, image_size)
            for m, lay in zip(self.peers, layouts)
        ]
        layouts = [lay if plan_ok else None for lay, (plan_ok, _) in zip(layouts, probes)]
        self.classifier_on_pre_logits = [head_ok for _, head_ok in probes]
        self.plans = [forward_plan(lay) if lay else None for lay in layouts]
        self.n_shared = 0  # leading plan entries computed once and shared by every branch
        if cfg.topology.kind == "shared_stem":
            self._share_stem(cfg, layouts[0])
        self.heads = None
        widths = self._dry_run(in_chans, image_size)
        if cfg.embedding.head != "none":
            self.heads = nn.ModuleList(
                _seeded(cfg.seed, -1 - i, lambda w=w: make_head(cfg.embedding.head, w, cfg.embedding))
                for i, w in zip(self.index, widths)
            )

    # ------------------------------------------------------------------------------------ building
    def _share_stem(self, cfg: Config, layout) -> None:
        if len(set(self.archs)) != 1:
            raise UserError(f"topology.kind: shared_stem needs one architecture for every peer, got {self.archs}")
        if layout is None:
            raise UserError(
                f"topology.kind: shared_stem needs a stem/stages architecture; {self.archs[0]!r} has none "
                "(use the CIFAR zoo, a timm ResNet or ConvNeXt, or topology.kind=independent)"
            )
        stem, stages, _ = layout
        k = cfg.topology.split
        if k >= len(stages):
            raise UserError(
                f"topology.split: {k} shares every stage of {self.archs[0]!r} ({len(stages)} stages); "
                f"allowed 0..{len(stages) - 1}"
            )
        self.n_shared = len(stem) + k
        for model in self.peers[1:]:
            for name, _ in self.plans[0][: self.n_shared]:
                _set_submodule(model, name, self.peers[0].get_submodule(name))

    @torch.no_grad()
    def _dry_run(self, in_chans: int, image_size: tuple[int, int]) -> list[int]:
        """Record the pre-logits widths and every tap's shape with one eval-mode forward of 2 samples."""
        was_training = self.training
        self.eval()
        out = self.forward(torch.zeros(2, in_chans, *image_size), taps=self.available_taps())
        self.train(was_training)
        self.tap_shapes = [{k: tuple(v.shape[1:]) for k, v in t.items()} for t in out.taps]
        return [p.shape[1] for p in out.pre_logits]

    def available_taps(self) -> list[str]:
        """Tap names: `stem`, `stage1..S` for stem/stages models, else timm's `feature{i}` indices."""
        names = {"logits", "pre_logits"}
        for model, plan in zip(self.peers, self.plans):
            if plan:
                names.update(label for _, label in plan if label)
            else:
                names.update(f"feature{i}" for i in range(len(getattr(model, "feature_info", []))))
        return sorted(names)

    # ------------------------------------------------------------------------------------- running
    def peer_model(self, p: int) -> nn.Module:
        """Peer p as a complete network (shared modules included): what eval and export use."""
        return self.peers[p]

    def forward(self, inputs: torch.Tensor | list[torch.Tensor], taps=(), live: list[int] | None = None) -> GroupOutput:
        """Run every peer; `inputs` is one batch for all, or a list of per-peer views. `live`: the local peers
        whose outputs carry gradient; the others run without autograd, as fixed targets (None: all are live)."""
        if live is not None and self.n_shared:
            raise ValueError("PeerGroup: live peers need an independent topology (a shared stem feeds every peer)")
        per_view = isinstance(inputs, (list, tuple))
        views = list(inputs) if per_view else [inputs] * len(self.peers)
        want = set(taps)

        def each(fn, *columns) -> list:
            """fn(p, ...) for every peer p, under p's autograd mode."""
            out = []
            for p, args in enumerate(zip(*columns)):
                with contextlib.nullcontext() if live is None or p in live else torch.no_grad():
                    out.append(fn(p, *args))
            return out

        shared: list = []  # the shared stem's (output, taps), computed once per input

        def features(p, model, plan, x):
            t: dict[str, torch.Tensor] = {}
            if self.n_shared:
                if not shared or per_view:
                    stem_taps: dict[str, torch.Tensor] = {}
                    shared[:] = [(_run(model, plan[: self.n_shared], x, want, stem_taps), stem_taps)]
                h, stem_taps = shared[0]
                t.update(stem_taps)
                if self.stem_grad_scale != 1.0 and torch.is_grad_enabled():
                    h = _ScaleGrad.apply(h, self.stem_grad_scale)
                return _run(model, plan[self.n_shared :], h, want, t), t
            if plan:
                return _run(model, plan, x, want, t), t
            idx = sorted(int(w[7:]) for w in want if w.startswith("feature") and int(w[7:]) < len(model.feature_info))
            if idx:
                f, inter = model.forward_intermediates(x, indices=idx)
                return f, {f"feature{i}": v for i, v in zip(idx, inter)}
            return model.forward_features(x), t

        feats, tapped = zip(*each(features, self.peers, self.plans, views))
        pre = each(lambda p, m, f: m.forward_head(f, pre_logits=True), self.peers, feats)
        logits = torch.stack(each(lambda p, m, h, f, split: m.get_classifier()(h) if split else m.forward_head(f),
                                  self.peers, pre, feats, self.classifier_on_pre_logits))
        emb = None
        if self.heads is not None:
            emb = torch.stack(each(lambda p, head, h: F.normalize(head(h).float(), dim=1), self.heads, pre))
        for p, t in enumerate(tapped):
            if "pre_logits" in want:
                t["pre_logits"] = pre[p]
            if "logits" in want:
                t["logits"] = logits[p]
        return GroupOutput(logits=logits, pre_logits=pre, embeddings=emb, taps=list(tapped))

    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the keys of a group holding every peer (`peers.<global index>.*`)."""
        return {_reindex(k, self.index): v for k, v in self.state_dict().items()}

    def load_global_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load this process's peers from a full group's state dict."""
        back = {g: i for i, g in enumerate(self.index)}
        mine = {}
        for k, v in state.items():
            m = _PEER_KEY.match(k)
            if m is None or int(m.group(2)) in back:
                mine[k if m is None else _reindex(k, back)] = v
        self.load_state_dict(mine)

    def param_counts(self) -> list[int]:
        """Parameters of each peer's deployable network (shared stem counted in every peer; no heads)."""
        return [sum(p.numel() for p in m.parameters()) for m in self.peers]
