"""Discriminators of the adversarial terms (METHODS.md §1.10 shared mechanics, §2.9, §2.10).

A discriminator belongs to its term but never joins the peers' optimizer. The term declares one `UpdatePhase`
over all its discriminators (its own Adam); the trainer runs it after each forward, before the peers' losses:
  1. D step: BCE(D(real), 1) and BCE(D(fake), 0) on DETACHED inputs (one mean over the 2B predictions; real and
     fake go through D as separate batches, so D's BatchNorm never mixes them), D's gradients averaged over the
     data ranks, one Adam step;
  2. the peers' adversarial loss BCE(D(fake), 1) through D with its parameters detached and its BatchNorm buffers
     copied (D frozen): the main backward reaches the peers and their adapters, never D.
So the peers are scored by the D that has just taken this step's update. With gradient accumulation D steps
once per micro-batch.
"""

from __future__ import annotations

import contextlib
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from mutualkd.config import Strict


class DiscriminatorConfig(Strict):
    """Discriminators always have their own optimizer (METHODS §1.10 Gap: Adam 2e-4, β (0.5, 0.999), wd 0)."""

    lr: float = Field(2e-4, gt=0.0)
    betas: list[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field([0.5, 0.999], min_length=2, max_length=2)
    weight_decay: float = Field(0.0, ge=0.0)


def discriminator_optimizer(params, cfg: DiscriminatorConfig) -> torch.optim.Adam:
    """The discriminators' own Adam (per-parameter state: one over several discriminators equals one each)."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _fp32(x: torch.Tensor):
    """Autocast off on `x`'s device: discriminator math runs in fp32 (METHODS §0.5)."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


class _GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # a mean, not AdaptiveAvgPool2d: deterministic backward on CUDA


class Discriminator(nn.Module):
    """One discriminator (METHODS §1.10): `loss` is its own BCE on detached (real, fake) inputs, `fool` the
    adversarial loss of the side that produced `fake`, with D frozen."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @classmethod
    def for_maps(cls, shape: tuple[int, ...]) -> Discriminator:
        """§1.10: 2×(conv3×3 stride 2 – BN – LeakyReLU 0.2) → GAP → Linear → 1 logit, widths = the map's C.
        A conv keeps stride 1 once the map is below 4×4 (a 2×2 map is not squeezed to 1×1 before GAP)."""
        c, h, w = shape
        layers: list[nn.Module] = []
        for _ in range(2):
            stride = 2 if min(h, w) >= 4 else 1
            layers += [nn.Conv2d(c, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.LeakyReLU(0.2, inplace=True)]
            h, w = -(-h // stride), -(-w // stride)
        return cls(nn.Sequential(*layers, _GlobalAvgPool(), nn.Linear(c, 1)))

    @classmethod
    def for_probabilities(cls, classes: int, hidden: int) -> Discriminator:
        """LW-KD (§2.10): an MLP on C-dim probabilities, Linear(C, hidden) – LeakyReLU 0.2 – Linear(hidden, 1)."""
        return cls(nn.Sequential(nn.Linear(classes, hidden), nn.LeakyReLU(0.2, inplace=True), nn.Linear(hidden, 1)))

    def loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """D's BCE on detached inputs (real label 1, fake label 0), one mean over the 2B predictions."""
        with _fp32(real):
            logits = torch.cat([self.net(real.detach().float()), self.net(fake.detach().float())]).squeeze(1)
            labels = torch.zeros_like(logits)
            labels[: len(real)] = 1.0
            return F.binary_cross_entropy_with_logits(logits, labels)

    def fool(self, fake: torch.Tensor) -> torch.Tensor:
        """BCE(D(fake), 1), mean: the gradient reaches `fake` only; D's parameters and buffers stay untouched."""
        frozen = {k: v.detach() for k, v in self.net.named_parameters()}
        frozen.update({k: v.clone() for k, v in self.net.named_buffers()})  # BN statistics: throw-away copies
        with _fp32(fake):
            logits = functional_call(self.net, frozen, (fake.float(),)).squeeze(1)
            return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
