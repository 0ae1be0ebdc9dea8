"""CIFAR VGGs with BN as defined in RepDistiller (its ``vgg*_bn``, called vgg8/11/13 in the literature).

Registered as ``cifar_vgg8/11/13``: timm already owns ``vgg11``/``vgg13`` (ImageNet), which must stay intact.

Five conv groups (3x3 conv with bias -> BN -> ReLU); 2x2 max-pools between the first four groups only, so a
32x32 input ends at 4x4; then global average pool and a single 512 -> num_classes Linear (no FC stack).
The stem is group 0; each stage starts with its max-pool (the last stage has none) and ends where
RepDistiller's feature blocks end.
"""
from collections.abc import Sequence

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from ._common import StagedNet, build_staged, cifar_cfg, conv_bn, init_weights

__all__ = ['CifarVGG']

_CFGS = {
    'cifar_vgg8': ((64,), (128,), (256,), (512,), (512,)),
    'cifar_vgg11': ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    'cifar_vgg13': ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class CifarVGG(StagedNet):
    """VGG-BN for 32x32 inputs; ``cfg`` lists the conv widths of the stem group and of the four stages."""

    def __init__(
            self,
            cfg: Sequence[Sequence[int]] = _CFGS['cifar_vgg13'],
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        groups, in_chs = [], in_chans
        for i, widths in enumerate(cfg):
            layers = [nn.MaxPool2d(2, 2)] if 0 < i < len(cfg) - 1 else []
            for w in widths:
                layers.append(conv_bn(in_chs, w, 3, bias=True))
                in_chs = w
            groups.append(nn.Sequential(*layers))
        self.stem = groups[0]
        self.stages = nn.Sequential(*groups[1:])
        self.norm_pre = nn.Identity()
        self._init_head(
            in_chans, num_classes, [g[-1] for g in cfg], (1, 2, 4, 8, 8),
            global_pool=global_pool, drop_rate=drop_rate,
        )
        init_weights(self, linear_std=0.01)


def _create(variant: str, pretrained: bool, **kwargs) -> CifarVGG:
    return build_staged(CifarVGG, variant, pretrained, 4, cfg=_CFGS[variant], **kwargs)


default_cfgs = generate_default_cfgs({name: cifar_cfg(first_conv='stem.0.conv') for name in _CFGS})


def cifar_vgg8(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-8-BN (one conv per group)."""
    return _create('cifar_vgg8', pretrained, **kwargs)


def cifar_vgg11(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-11-BN (configuration A)."""
    return _create('cifar_vgg11', pretrained, **kwargs)


def cifar_vgg13(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-13-BN (configuration B)."""
    return _create('cifar_vgg13', pretrained, **kwargs)


for _fn in (cifar_vgg8, cifar_vgg11, cifar_vgg13):
    register_model(_fn)
