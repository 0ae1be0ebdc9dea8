"""RepDistiller's CIFAR ShuffleNetV1 (groups 3, widths 240/480/960) and ShuffleNetV2 (net size 1).

Both use a 1x1 conv-bn-relu stem of width 24 (no stride, no max-pool) and three stages that each start
with a stride-2 block, so a 32x32 input ends at 4x4. As in the reference code, weights keep PyTorch's
default (Kaiming-uniform) initialisation.
"""
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._common import StagedNet, build_staged, cifar_cfg, conv_bn

__all__ = ['ShuffleNetV1', 'ShuffleNetV2']

_STEM_CHS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups so the next grouped conv mixes information across them."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1, added to the input or, when strided,
    concatenated with its 3x3 average-pooled copy (so ``branch_chs`` is the width added by the branch)."""

    def __init__(self, in_chs: int, branch_chs: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid_chs = branch_chs // 4
        self.first_groups = first_groups
        self.conv1 = conv_bn(in_chs, mid_chs, 1, groups=first_groups)
        self.conv2 = conv_bn(mid_chs, mid_chs, 3, stride, groups=mid_chs)
        self.conv3 = conv_bn(mid_chs, branch_chs, 1, groups=groups, act=False)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(channel_shuffle(self.conv1(x), self.first_groups)))
        out = out + x if self.pool is None else torch.cat([out, self.pool(x)], 1)
        return self.act(out)


class ShuffleNetV1(StagedNet):
    """ShuffleNetV1 with ``groups`` groups, stage widths ``out_chs`` and ``num_blocks`` blocks per stage."""

    def __init__(
            self,
            out_chs: Sequence[int] = (240, 480, 960),
            num_blocks: Sequence[int] = (4, 8, 4),
            groups: int = 3,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        self.stem = conv_bn(in_chans, _STEM_CHS, 1)
        stages, in_chs = [], _STEM_CHS
        for stage_chs, n in zip(out_chs, num_blocks):
            # The first block of the network sees the narrow stem, so its first 1x1 conv is not grouped.
            first_groups = 1 if in_chs == _STEM_CHS else groups
            blocks = [ShuffleV1Block(in_chs, stage_chs - in_chs, 2, groups, first_groups)]
            blocks += [ShuffleV1Block(stage_chs, stage_chs, 1, groups, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs = stage_chs
        self.stages = nn.Sequential(*stages)
        self.norm_pre = nn.Identity()
        self._init_head(
            in_chans, num_classes, (_STEM_CHS, *out_chs), (1, 2, 4, 8),
            global_pool=global_pool, drop_rate=drop_rate,
        )


class ShuffleV2Block(nn.Module):
    """Split the channels in half, transform one half (1x1, 3x3 depthwise, 1x1), concatenate, shuffle."""

    def __init__(self, chs: int):
        super().__init__()
        half = chs // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1),
            conv_bn(half, half, 3, groups=half, act=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, transform = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(transform)], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block: two branches on the full input, each to half the output width, concatenated, shuffled."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        mid_chs = out_chs // 2
        self.left = nn.Sequential(
            conv_bn(in_chs, in_chs, 3, 2, groups=in_chs, act=False),
            conv_bn(in_chs, mid_chs, 1),
        )
        self.right = nn.Sequential(
            conv_bn(in_chs, mid_chs, 1),
            conv_bn(mid_chs, mid_chs, 3, 2, groups=mid_chs, act=False),
            conv_bn(mid_chs, mid_chs, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(StagedNet):
    """ShuffleNetV2: per stage a down block plus ``num_blocks`` basic blocks; a 1x1 conv to
    ``last_chs`` is ``norm_pre``."""

    def __init__(
            self,
            out_chs: Sequence[int] = (116, 232, 464),
            num_blocks: Sequence[int] = (3, 7, 3),
            last_chs: int = 1024,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        self.stem = conv_bn(in_chans, _STEM_CHS, 1)
        stages, in_chs = [], _STEM_CHS
        for stage_chs, n in zip(out_chs, num_blocks):
            blocks = [ShuffleV2DownBlock(in_chs, stage_chs)] + [ShuffleV2Block(stage_chs) for _ in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_chs = stage_chs
        self.stages = nn.Sequential(*stages)
        self.norm_pre = conv_bn(in_chs, last_chs, 1)
        self._init_head(
            in_chans, num_classes, (_STEM_CHS, *out_chs), (1, 2, 4, 8), num_features=last_chs,
            global_pool=global_pool, drop_rate=drop_rate,
        )


default_cfgs = generate_default_cfgs({name: cifar_cfg() for name in ('shufflenet_v1', 'shufflenet_v2')})


@register_model
def shufflenet_v1(pretrained: bool = False, **kwargs) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: groups 3, stage widths 240/480/960, 4/8/4 blocks."""
    return build_staged(ShuffleNetV1, 'shufflenet_v1', pretrained, 3, **kwargs)


@register_model
def shufflenet_v2(pretrained: bool = False, **kwargs) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net size 1): stage widths 116/232/464, last conv 1024."""
    return build_staged(ShuffleNetV2, 'shufflenet_v2', pretrained, 3, **kwargs)
