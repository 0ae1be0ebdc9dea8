"""The generative teacher's reconstruction auxiliary (METHODS.md §2.9): train a teacher with CE + this term,
λ_rec·mean(R(E(x)) − x)² with a light upsampling decoder R per peer from a tap back to the input. The teacher
it makes is the `adversarial_teacher` of `complementary` with `routing: mktn`.

    peers: [{arch: cifar_resnet32x4}]
    objective:
      terms:
        - {name: ce}
        - {name: reconstruction, weight: 1.0, tap: stage3}
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mutualkd.config import TermConfig
from mutualkd.errors import UserError
from mutualkd.losses.base import Term
from mutualkd.losses.teacher import last_stage
from mutualkd.registry import register_term


class ReconstructionConfig(TermConfig):
    """Teacher-side reconstruction auxiliary (METHODS §2.9): λ_rec·mean(R(E(x)) − x)² with a light upsampling
    decoder R on a peer's tap; train a teacher with CE + this term (Gap: λ_rec = 1)."""

    name: Literal["reconstruction"] = "reconstruction"
    tap: str | None = None  # None: the last stage


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


@register_term("reconstruction", ReconstructionConfig)
class Reconstruction(Term):
    """The generative teacher's auxiliary (METHODS §2.9): train a teacher with CE + this term. Per peer a light
    upsampling decoder R from a tap (default the last stage) back to the input; per peer mean((R(E(x)) − x)²)
    against the peer's normalised input `batch["input"]`, summed over peers; weight = λ_rec (Gap: 1)."""

    def __init__(self, cfg, ctx, key):
        super().__init__(cfg, ctx, key)
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
