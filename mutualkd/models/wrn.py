"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) as defined in RepDistiller.

Pre-activation basic blocks; bare 3x3 conv stem of width 16, three stages of (d - 4) / 6 blocks with widths
16k/32k/64k (strides 1, 2, 2), and the final BN + ReLU as ``norm_pre``.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._common import StagedNet, build_staged, cifar_cfg, init_weights

__all__ = ['WideResNet']


def _bn_act(chs: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(chs), act=nn.ReLU(inplace=True)))


class PreActBlock(nn.Module):
    """bn-relu-conv, bn-relu-conv; a changing block projects its pre-activated input with a 1x1 conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.pre1 = _bn_act(in_chs)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.pre2 = _bn_act(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        needs_proj = stride != 1 or in_chs != out_chs
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride, bias=False) if needs_proj else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre1(x)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(self.pre2(self.conv1(out))) + shortcut


class WideResNet(StagedNet):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs."""

    def __init__(
            self,
            depth: int = 40,
            widen_factor: int = 2,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        assert (depth - 4) % 6 == 0, 'depth must be 6n + 4'
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)))
        stages = []
        for i, (in_chs, out_chs) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 1 if i == 0 else 2
            blocks = [PreActBlock(in_chs if j == 0 else out_chs, out_chs, stride if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm_pre = _bn_act(widths[-1])
        self._init_head(in_chans, num_classes, widths, (1, 1, 2, 4), global_pool=global_pool, drop_rate=drop_rate)
        init_weights(self)
        if num_classes:
            nn.init.zeros_(self.fc.bias)


def _create(variant: str, pretrained: bool, depth: int, widen_factor: int, **kwargs) -> WideResNet:
    return build_staged(WideResNet, variant, pretrained, 3, depth=depth, widen_factor=widen_factor, **kwargs)


default_cfgs = generate_default_cfgs({
    name: cifar_cfg() for name in ('wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2')
})


@register_model
def wrn_16_1(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-1."""
    return _create('wrn_16_1', pretrained, 16, 1, **kwargs)


@register_model
def wrn_16_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-16-2."""
    return _create('wrn_16_2', pretrained, 16, 2, **kwargs)


@register_model
def wrn_40_1(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-1."""
    return _create('wrn_40_1', pretrained, 40, 1, **kwargs)


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-40-2."""
    return _create('wrn_40_2', pretrained, 40, 2, **kwargs)
