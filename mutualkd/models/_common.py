"""What every model of the CIFAR zoo shares: layer helpers, the staged-network base class and the builder.

Each architecture only builds ``stem``, ``stages`` and ``norm_pre``; the base class adds the timm
protocol (classifier, ``forward_intermediates``, pruning) on top of that split, so peer groups can
share a stem or a prefix of stages and every model still behaves like any other timm model.
"""
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from .stats import CIFAR100_MEAN, CIFAR100_STD


def cifar_cfg(first_conv: str = 'stem.conv', **kwargs) -> dict:
    """Pretrained cfg of a CIFAR-100 model; no hosted weights, load local files via ``pretrained_cfg_overlay``."""
    return {
        'url': '', 'num_classes': 100, 'input_size': (3, 32, 32), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': first_conv, 'classifier': 'fc', **kwargs,
    }


def conv_bn(
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        bias: bool = False,
) -> nn.Sequential:
    """'Same'-padded conv -> BN (-> ReLU): the unit all the zoo's post-activation blocks are made of."""
    layers = OrderedDict(
        conv=nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias),
        bn=nn.BatchNorm2d(out_chs),
    )
    if act:
        layers['act'] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """The reference codes' init: Kaiming-normal (fan_out, ReLU) convs with zero bias, BN to identity.

    With ``linear_std``, Linear layers get N(0, linear_std) weights and zero bias (RepDistiller's VGG and
    MobileNetV2); otherwise they keep PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0., linear_std)
            nn.init.zeros_(m.bias)


class StagedNet(nn.Module):
    """Base class: ``forward_features = norm_pre(stages(stem(x)))``, head = global pool -> dropout -> ``fc``.

    Feature points (``feature_info``, ``forward_intermediates``) are the stem output (index 0) and the
    output of every stage (index l for stage l). Subclasses set ``stem``, ``stages`` and ``norm_pre``
    and then call ``_init_head``.
    """

    stem: nn.Module
    stages: nn.Sequential
    norm_pre: nn.Module

    def _init_head(
            self,
            in_chans: int,
            num_classes: int,
            widths: Sequence[int],
            reductions: Sequence[int],
            num_features: int | None = None,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ) -> None:
        """Record the protocol attributes and build the classifier.

        ``widths``/``reductions`` describe the S+1 feature points; ``num_features`` is the width after
        ``norm_pre`` (default: the last stage's width).
        """
        assert len(widths) == len(reductions) == len(self.stages) + 1
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features or widths[-1]
        self.drop_rate = drop_rate
        self.feature_info = [
            dict(num_chs=c, reduction=r, module='stem' if i == 0 else f'stages.{i - 1}')
            for i, (c, r) in enumerate(zip(widths, reductions))
        ]
        self.feature_info[-1]['num_chs_norm'] = self.num_features  # width of the last point with norm=True
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0``: none); ``global_pool=None`` keeps the pooling type."""
        self.num_classes = num_classes
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns the feature points selected by ``indices`` (timm semantics).

        Args:
            x: Input images.
            indices: Last n points if int, all if None, else the listed points (negative from the end).
            norm: Apply ``norm_pre`` to the last point when it is taken.
            stop_early: Stop after the last selected point (the final features are then un-normed).
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the list of intermediates.

        Returns:
            ``(final_features, intermediates)`` or just ``intermediates``.
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        stages = self.stages[:max_index] if stop_early and not torch.jit.is_scripting() else self.stages

        x = self.stem(x)
        intermediates = [x] if 0 in take_indices else []
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm_pre(x) if norm and feat_idx == num_stages else x)

        if intermediates_only:
            return intermediates
        if len(stages) == num_stages:
            x = self.norm_pre(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and norm/head) not needed to compute the feature points in ``indices``.

        The head is sized and trained for ``norm_pre``'s output, so it goes whenever ``norm_pre`` does.
        Returns the absolute indices kept.
        """
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages + 1, indices)
        self.stages = self.stages[:max_index]
        drop_norm = max_index < num_stages or (prune_norm and not isinstance(self.norm_pre, nn.Identity))
        if drop_norm:
            self.norm_pre = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or drop_norm:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled final feature map."""
        return self.norm_pre(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool (+ dropout) to the [B, num_features] pre-logits, then the classifier unless ``pre_logits``."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_staged(model_cls: type, variant: str, pretrained: bool, num_stages: int, **kwargs) -> StagedNet:
    """``build_model_with_cfg`` with ``features_only`` served by ``forward_intermediates`` over all S+1 points."""
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        feature_cfg=dict(out_indices=tuple(range(num_stages + 1)), feature_cls='getter'),
        **kwargs,
    )
