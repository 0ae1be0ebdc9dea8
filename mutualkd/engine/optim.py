"""Optimizer and per-step learning-rate schedule (warm-up, then cosine, step decay or constant)."""

from __future__ import annotations

import math

import torch

from mutualkd.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at fractional epoch `epoch`."""
    s = cfg.schedule
    if epoch < s.warmup_epochs:
        return s.warmup_start_factor + (1 - s.warmup_start_factor) * epoch / s.warmup_epochs
    if s.name == "step":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    if s.name == "cosine":
        period = s.period_epochs or cfg.epochs
        t = min((epoch - s.warmup_epochs) / max(period - s.warmup_epochs, 1e-12), 1.0)
        floor = s.min_lr / cfg.optimizer.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def build_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step / steps_per_epoch, cfg))
