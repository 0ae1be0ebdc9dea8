"""CIFAR ResNets (He et al. 2016) as defined in RepDistiller and used across the CIFAR distillation literature.

Basic blocks, 3x3 stem without max-pool, three stages (strides 1, 2, 2) of (depth - 2) / 6 blocks each and
1x1 conv + BN projection shortcuts. The ``x4`` variants widen stem/stages to 32/64/128/256.
"""
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._common import StagedNet, build_staged, cifar_cfg, conv_bn, init_weights

__all__ = ['CifarResNet']


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-bn-relu, conv-bn, add shortcut, relu."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(in_chs, out_chs, 3, stride)
        self.conv2 = conv_bn(out_chs, out_chs, 3, act=False)
        needs_proj = stride != 1 or in_chs != out_chs
        self.downsample = conv_bn(in_chs, out_chs, 1, stride, act=False) if needs_proj else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.downsample(x))


class CifarResNet(StagedNet):
    """ResNet-(6n+2) for 32x32 inputs; ``widths`` = (stem, stage1, stage2, stage3)."""

    def __init__(
            self,
            depth: int = 32,
            widths: Sequence[int] = (16, 16, 32, 64),
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        assert (depth - 2) % 6 == 0, 'depth must be 6n + 2'
        n = (depth - 2) // 6
        self.stem = conv_bn(in_chans, widths[0], 3)
        stages, in_chs = [], widths[0]
        for i, out_chs in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm_pre = nn.Identity()
        self._init_head(in_chans, num_classes, widths, (1, 1, 2, 4), global_pool=global_pool, drop_rate=drop_rate)
        init_weights(self)


def _create(variant: str, pretrained: bool, depth: int, widths: Sequence[int], **kwargs) -> CifarResNet:
    return build_staged(CifarResNet, variant, pretrained, 3, depth=depth, widths=widths, **kwargs)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)

default_cfgs = generate_default_cfgs({
    name: cifar_cfg() for name in (
        'cifar_resnet8', 'cifar_resnet14', 'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44',
        'cifar_resnet56', 'cifar_resnet110', 'cifar_resnet8x4', 'cifar_resnet32x4',
    )
})


@register_model
def cifar_resnet8(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8, widths 16/32/64."""
    return _create('cifar_resnet8', pretrained, 8, _NARROW, **kwargs)


@register_model
def cifar_resnet14(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-14, widths 16/32/64."""
    return _create('cifar_resnet14', pretrained, 14, _NARROW, **kwargs)


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20, widths 16/32/64."""
    return _create('cifar_resnet20', pretrained, 20, _NARROW, **kwargs)


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32, widths 16/32/64."""
    return _create('cifar_resnet32', pretrained, 32, _NARROW, **kwargs)


@register_model
def cifar_resnet44(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44, widths 16/32/64."""
    return _create('cifar_resnet44', pretrained, 44, _NARROW, **kwargs)


@register_model
def cifar_resnet56(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56, widths 16/32/64."""
    return _create('cifar_resnet56', pretrained, 56, _NARROW, **kwargs)


@register_model
def cifar_resnet110(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110, widths 16/32/64."""
    return _create('cifar_resnet110', pretrained, 110, _NARROW, **kwargs)


@register_model
def cifar_resnet8x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8x4: stem 32, stages 64/128/256."""
    return _create('cifar_resnet8x4', pretrained, 8, _WIDE, **kwargs)


@register_model
def cifar_resnet32x4(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32x4: stem 32, stages 64/128/256."""
    return _create('cifar_resnet32x4', pretrained, 32, _WIDE, **kwargs)
