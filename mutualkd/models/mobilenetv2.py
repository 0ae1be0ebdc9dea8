"""RepDistiller's CIFAR MobileNetV2 (``mobile_half``: width multiplier 0.5, expansion T=6).

Unlike torchvision's it keeps the expansion 1x1 conv in the t=1 block, uses stride 1 for the 24-channel
group (so a 32x32 input ends at 2x2) and keeps the 1280-wide last conv at width 0.5. Stages are grouped at
RepDistiller's feature points (block groups 0-1, 2, 3-4, 5-6); the last 1x1 conv-bn-relu is ``norm_pre``.
"""
import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._common import StagedNet, build_staged, cifar_cfg, conv_bn, init_weights

__all__ = ['CifarMobileNetV2']

# (expansion, 0 meaning the model's T; channels; blocks; first stride) per block group, grouped into stages.
_STAGES = (
    ((1, 16, 1, 1), (0, 24, 2, 1)),
    ((0, 32, 3, 2),),
    ((0, 64, 4, 2), (0, 96, 3, 1)),
    ((0, 160, 3, 2), (0, 320, 1, 1)),
)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> linear 1x1 project, with identity shortcut when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int):
        super().__init__()
        mid_chs = in_chs * expand_ratio
        self.use_res = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            conv_bn(in_chs, mid_chs, 1),
            conv_bn(mid_chs, mid_chs, 3, stride, groups=mid_chs),
            conv_bn(mid_chs, out_chs, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class CifarMobileNetV2(StagedNet):
    """MobileNetV2 with expansion ``t`` and width multiplier ``width_mult`` for 32x32 inputs."""

    def __init__(
            self,
            t: int = 6,
            width_mult: float = 0.5,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        in_chs = int(32 * width_mult)
        self.stem = conv_bn(in_chans, in_chs, 3, 2)
        stages, widths, reductions, reduction = [], [in_chs], [2], 2
        for stage_cfg in _STAGES:
            blocks = []
            for expand, c, n, s in stage_cfg:
                out_chs = int(c * width_mult)
                for j in range(n):
                    blocks.append(InvertedResidual(in_chs, out_chs, s if j == 0 else 1, expand or t))
                    in_chs = out_chs
                reduction *= s
            stages.append(nn.Sequential(*blocks))
            widths.append(in_chs)
            reductions.append(reduction)
        self.stages = nn.Sequential(*stages)
        last_chs = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.norm_pre = conv_bn(in_chs, last_chs, 1)
        self._init_head(
            in_chans, num_classes, widths, reductions, num_features=last_chs,
            global_pool=global_pool, drop_rate=drop_rate,
        )
        init_weights(self, linear_std=0.01)


default_cfgs = generate_default_cfgs({'mobilenetv2': cifar_cfg()})


@register_model
def mobilenetv2(pretrained: bool = False, **kwargs) -> CifarMobileNetV2:
    """RepDistiller's ``mobile_half``: MobileNetV2, T=6, width 0.5."""
    return build_staged(CifarMobileNetV2, 'mobilenetv2', pretrained, 4, t=6, width_mult=0.5, **kwargs)
