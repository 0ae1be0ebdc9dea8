"""Adversarial teacher terms and the reconstruction auxiliary: complementary features with the MKTN routing
(METHODS.md §2.9), LW-KD (§2.10), and the online `reconstruction` term that trains a generative teacher.

Discriminators (§1.10 shared mechanics) belong to their term but never join the peers' optimizer: each has
its own Adam and is stepped by the term, inside the term's training forward, in this order per D:
  1. D step: BCE(D(real), 1) and BCE(D(fake), 0) on DETACHED inputs (one mean over the 2B predictions;
     real and fake go through D as separate batches, so D's BatchNorm never mixes them), D's gradients
     averaged over the data ranks (`placement.average_grads`), one Adam step, D's gradients cleared;
  2. the peers' adversarial loss BCE(D(fake), 1) through D with its parameters detached and its BatchNorm
     buffers copied (D frozen): the main backward reaches the peers and their adapters, never D.
So the peers are scored by the D that has just taken this step's update. With gradient accumulation D steps
once per micro-batch. D's optimizer state is checkpointed as D's extra state (plain data).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mutualkd import placement
from mutualkd.config import DiscriminatorConfig
from mutualkd.errors import UserError
from mutualkd.losses import functional as MF
from mutualkd.losses.objective import Term, TermRNG, register
from mutualkd.losses.teacher import TeacherTerm, conv_regressor, last_stage


def _fp32(x: torch.Tensor):
    """Autocast off on `x`'s device: discriminator math runs in fp32 (METHODS §0.5)."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


class _GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # a mean, not AdaptiveAvgPool2d: deterministic backward on CUDA


class Discriminator(nn.Module):
    """One discriminator and its own Adam (METHODS §1.10): `step` trains it on detached (real, fake) inputs,
    `fool` is the adversarial loss of the side that produced `fake`, with D frozen."""

    def __init__(self, net: nn.Module, cfg: DiscriminatorConfig):
        super().__init__()
        self.net = net
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                          weight_decay=cfg.weight_decay)

    @classmethod
    def for_maps(cls, shape: tuple[int, ...], cfg: DiscriminatorConfig) -> Discriminator:
        """§1.10: 2×(conv3×3 stride 2 – BN – LeakyReLU 0.2) → GAP → Linear → 1 logit, widths = the map's C.
        A conv keeps stride 1 once the map is below 4×4 (a 2×2 map is not squeezed to 1×1 before GAP)."""
        c, h, w = shape
        layers: list[nn.Module] = []
        for _ in range(2):
            stride = 2 if min(h, w) >= 4 else 1
            layers += [nn.Conv2d(c, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.LeakyReLU(0.2, inplace=True)]
            h, w = -(-h // stride), -(-w // stride)
        return cls(nn.Sequential(*layers, _GlobalAvgPool(), nn.Linear(c, 1)), cfg)

    @classmethod
    def for_probabilities(cls, classes: int, hidden: int, cfg: DiscriminatorConfig) -> Discriminator:
        """LW-KD (§2.10): an MLP on C-dim probabilities, Linear(C, hidden) – LeakyReLU 0.2 – Linear(hidden, 1)."""
        net = nn.Sequential(nn.Linear(classes, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1))
        return cls(net, cfg)

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One D step on detached inputs (real label 1, fake label 0); returns D's loss (detached)."""
        params = list(self.net.parameters())
        with torch.enable_grad(), _fp32(real):
            logits = torch.cat([self.net(real.detach().float()), self.net(fake.detach().float())]).squeeze(1)
            labels = torch.zeros_like(logits)
            labels[: len(real)] = 1.0
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        placement.average_grads(params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def fool(self, fake: torch.Tensor) -> torch.Tensor:
        """BCE(D(fake), 1), mean: the gradient reaches `fake` only; D's parameters and buffers stay untouched."""
        frozen = {k: v.detach() for k, v in self.net.named_parameters()}
        frozen.update({k: v.clone() for k, v in self.net.named_buffers()})  # BN statistics: throw-away copies
        with _fp32(fake):
            logits = functional_call(self.net, frozen, (fake.float(),)).squeeze(1)
            return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    def get_extra_state(self):
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state):
        self.optimizer.load_state_dict(state["optimizer"])


# ------------------------------------------------------------------------------ complementary features
ALIGN_RULE = ("complementary needs C and H×W equal after the alignment block, which maps C_S -> C_T and changes "
              "H×W only by an integer factor (strided conv if the student map is larger, transposed conv if smaller)")


@register("complementary")
class Complementary(TeacherTerm):
    """Complementary features (METHODS §2.9, reconstructed): per (peer, teacher) an alignment block A
    (conv–BN–ReLU to the teacher's map, default the last stage) on the peer's map E_S;
    feature_weight·mean(A(E_S) − sg(E_T))² + adversarial_weight·BCE(D(A(E_S)), real), D per (peer, teacher)
    trained with real = E_T, fake = sg(A(E_S)). `routing: mktn` takes the feature loss from `feature_teacher`
    (discriminative) and the adversarial loss from `adversarial_teacher` (generative), each through its own A.
    Logged: `feature` (the MSE) and `adversarial` (the BCE), summed over peers, and `discriminator` (D's loss)."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        routed = ("feature_teacher", "adversarial_teacher")
        if cfg.routing == "mktn":
            missing = [f for f in routed if getattr(cfg, f) is None]
            if missing:
                raise UserError(f"{key}.{missing[0]}: routing mktn needs feature_teacher (the discriminative teacher) "
                                "and adversarial_teacher (the generative, reconstruction-trained one)")
            if cfg.teacher is not None:
                raise UserError(f"{key}.teacher: routing mktn takes its teachers from feature_teacher and "
                                "adversarial_teacher; remove teacher")
            tf, ta = (self.teacher_set.index(getattr(cfg, f)) for f in routed)
            self.routes = [([tf], [ta])] * self.num_peers  # per peer: (feature teachers, adversarial teachers)
            self.pairs = sorted({(p, t) for p in range(self.num_peers) for t in (tf, ta)})
        else:
            for f in routed:
                if getattr(cfg, f) is not None:
                    raise UserError(f"{key}.{f}: only used with routing mktn; use teacher (or the teacher policy)")
            self.routes = None
        self.tap, self.t_taps = self.resolve_taps("tap", cfg.tap, cfg.teacher_tap, last_stage)
        self.student_taps, self.teacher_taps = {self.tap}, set(self.t_taps.values())
        self.align = nn.ModuleDict()
        self.discriminators = nn.ModuleDict()
        adversarial = {(p, t) for p, (_, ts) in enumerate(self.routes) for t in ts} if self.routes else set(self.pairs)
        for p, t in self.pairs:
            s_shape, t_shape = self.student_shape(p, self.tap), self.teacher_shape(t, self.t_taps[t])
            block = conv_regressor(s_shape, t_shape) if len(s_shape) == 3 and len(t_shape) == 3 else None
            if block is None:
                raise self.shape_error(p, t, self.tap, self.t_taps[t], ALIGN_RULE)
            self.align[self.pair_key(p, t)] = block
            if (p, t) in adversarial:
                self.discriminators[self.pair_key(p, t)] = Discriminator.for_maps(t_shape, cfg.discriminator)

    def teacher_wants(self, assignment):
        if self.routes is None:
            return super().teacher_wants(assignment)
        return {t: {self.t_taps[t]} for _, t in self.pairs}

    def own_optimizer_parameters(self):
        return list(self.discriminators.parameters())

    def forward(self, out, batch, teach=None):
        cfg = self.cfg
        feature, adversarial, d_losses = [], [], []
        for p in range(self.num_peers):
            f_teachers, a_teachers = self.routes[p] if self.routes else (self.active(teach, p),) * 2
            f_s = out.taps[p][self.tap]  # A(E_S) per teacher: one A per (peer, teacher) serves both losses
            aligned = {t: self.align[self.pair_key(p, t)](f_s) for t in sorted({*f_teachers, *a_teachers})}
            feature.append(torch.stack([MF.fitnet_mse(aligned[t], teach.taps[t][self.t_taps[t]])
                                        for t in f_teachers]).mean())
            adv = []
            for t in a_teachers:
                d = self.discriminators[self.pair_key(p, t)]
                if self.training:
                    d_losses.append(d.step(real=teach.taps[t][self.t_taps[t]], fake=aligned[t]))
                adv.append(d.fool(aligned[t]))
            adversarial.append(torch.stack(adv).mean())
        feature, adversarial = torch.stack(feature), torch.stack(adversarial)
        per_peer = cfg.feature_weight * feature + cfg.adversarial_weight * adversarial
        parts = {"loss": per_peer.sum(), "per_peer": per_peer, "feature": feature.sum(),
                 "adversarial": adversarial.sum()}
        if d_losses:
            parts["discriminator"] = torch.stack(d_losses).mean()
        return parts


# ------------------------------------------------------------------------------------ reconstruction
def upsampling_decoder(tap_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> nn.Sequential:
    """R (Gap design): ×2 stages of nearest upsampling + conv3×3–BN–ReLU, halving the width (at least 16), while
    the map fits the input; a nearest resize to the input size when the factor is not a power of two; a 1×1 conv
    to the input channels with a linear output (normalised pixels). The output conv is 1×1 because the pixel
    regression's curvature grows with its fan-in: with a 3×3 one, the default SGD (lr 0.1) diverged in 5 steps."""
    (c, h, w), (c_in, height, width) = tap_shape, input_shape
    layers: list[nn.Module] = []
    while 2 * h <= height and 2 * w <= width:
        out = max(c // 2, 16)
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, out, 3, padding=1, bias=False),
                   nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c, h, w = out, 2 * h, 2 * w
    if (h, w) != (height, width):
        layers.append(nn.Upsample(size=(height, width), mode="nearest"))
    layers.append(nn.Conv2d(c, c_in, 1))
    return nn.Sequential(*layers)


@register("reconstruction")
class Reconstruction(Term):
    """The generative teacher's auxiliary (METHODS §2.9): train a teacher with CE + this term. Per peer a light
    upsampling decoder R from a tap (default the last stage) back to the input; per peer mean((R(E(x)) − x)²)
    against the peer's normalised input `batch["input"]`, summed over peers; weight = λ_rec (Gap: 1)."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        if len(ctx.tap_shapes) != self.num_peers:
            raise UserError(f"{key} (reconstruction): the decoders need every peer's taps in one process; "
                            "use placement=data_parallel")
        self.taps: list[str] = []
        self.decoders = nn.ModuleList()
        for name, shapes in zip(ctx.peer_names, ctx.tap_shapes):
            tap = cfg.tap or last_stage(shapes)
            if tap not in shapes:
                what = f"no tap {tap!r}" if tap else "no stage taps"
                raise UserError(f"{key}.tap: {name} has {what}; its taps: {', '.join(sorted(shapes))}")
            if len(shapes[tap]) != 3:
                raise UserError(f"{key}.tap: {name} {tap} is {list(shapes[tap])}, not a [C, H, W] map; the decoder "
                                "upsamples a feature map")
            self.taps.append(tap)
            self.decoders.append(upsampling_decoder(shapes[tap], ctx.input_shape))
        self.student_taps = set(self.taps)

    def forward(self, out, batch, teach=None):
        x = batch["input"]  # one tensor, or per-peer views
        per_peer = torch.stack([
            (dec(out.taps[p][tap]).float() - (x[p] if isinstance(x, (list, tuple)) else x).float()).pow(2).mean()
            for p, (dec, tap) in enumerate(zip(self.decoders, self.taps))
        ])
        return {"loss": per_peer.sum(), "per_peer": per_peer}


# ----------------------------------------------------------------------------------------------- LW-KD
@register("lwkd")
class LWKD(TeacherTerm):
    """LW-KD (METHODS §2.10, reconstructed). The lightweight teacher never sees the batch: a sample of class y
    gets t = softmax(T_lw(x̃_y)/τ), x̃_y a random image of class y from the teacher's own (synthesised) training
    set, redrawn every step by the term's seeded generator. Per peer and teacher the loss is
    τ²·KL(t ‖ softmax(z/τ)) (batchmean) + (adversarial_weight/α)·BCE(D(softmax(z/τ)), real), so that with
    weight = α the objective adds α·τ²·KL + λ_adv·BCE; D is an MLP on C-dim probabilities, real = t,
    fake = sg(softmax(z/τ)). Logged: `kl` and `adversarial` (unweighted, summed over peers), `discriminator`."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
        if cfg.weight == 0:
            raise UserError(f"{key}.weight: lwkd's weight is α and must be > 0 (the adversarial part is scaled by "
                            "adversarial_weight/α); leave the term out instead")
        self.require_classes(ctx.num_classes, "LW-KD needs the same classes C on both sides (METHODS.md §2.10)")
        for t in sorted({t for _, t in self.pairs}):
            teacher = self.teacher(t)
            if teacher.data_cfg is None:
                raise UserError(f"{key} (lwkd): {teacher.name} must be a mutualkd run directory (teachers.{t}.run): "
                                "LW-KD draws its inputs from the dataset the teacher was trained on")
        self.discriminators = nn.ModuleDict({
            self.pair_key(p, t): Discriminator.for_probabilities(ctx.num_classes, cfg.hidden, cfg.discriminator)
            for p, t in self.pairs
        })
        self.rng = TermRNG(ctx.seed * 1_000_003 + 0x4C574B44 + ctx.rank)  # data ranks draw for their own shards

    def own_optimizer_parameters(self):
        return list(self.discriminators.parameters())

    def teacher_logits(self, t: int, y: torch.Tensor) -> torch.Tensor:
        """[B, C] logits of teacher t on a fresh random image of each label in y (from its training set)."""
        return self.teacher(t).from_labels(y, self.rng(y.device)).float()

    def forward(self, out, batch, teach=None):
        cfg, y, z = self.cfg, batch["target"], out.logits.float()
        sets = [self.active(teach, p) for p in range(self.num_peers)]
        lw = {t: self.teacher_logits(t, y) for t in sorted({t for ts in sets for t in ts})}
        kl, adversarial, d_losses = [], [], []
        for p, ts in enumerate(sets):
            fake = torch.softmax(z[p] / cfg.T, dim=-1)
            kl.append(torch.stack([MF.kd_kl(z[p], lw[t], cfg.T) for t in ts]).mean())
            adv = []
            for t in ts:
                d = self.discriminators[self.pair_key(p, t)]
                if self.training:
                    d_losses.append(d.step(real=torch.softmax(lw[t] / cfg.T, dim=-1), fake=fake))
                adv.append(d.fool(fake))
            adversarial.append(torch.stack(adv).mean())
        kl, adversarial = torch.stack(kl), torch.stack(adversarial)
        per_peer = kl + (cfg.adversarial_weight / cfg.weight) * adversarial
        parts = {"loss": per_peer.sum(), "per_peer": per_peer, "kl": kl.sum(), "adversarial": adversarial.sum()}
        if d_losses:
            parts["discriminator"] = torch.stack(d_losses).mean()
        return parts

    def get_extra_state(self):
        return self.rng.state()

    def set_extra_state(self, state):
        self.rng.load(state)
