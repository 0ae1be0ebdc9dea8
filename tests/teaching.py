"""Shared pieces of the teacher-term tests: a digits teacher trained with mutualkd, and a few real training
steps of a student group through the trainer's own step (`Trainer.train_step`), returning everything a test
needs to check gradients, teacher invariance and the logged parts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mutualkd import config as C
from mutualkd.cli import main
from mutualkd.engine.trainer import Trainer

# A teacher on digits: one cifar_resnet14 peer (3 stages: 16x8x8, 32x4x4, 64x2x2 on 8x8 inputs), CE only.
TEACHER = ["peers=[{arch: cifar_resnet14}]", "objective.terms=[{name: ce}]", "train.epochs=2",
           "train.progress=false"]


def train_teacher(run_dir, *overrides) -> str:
    assert main(["train", *TEACHER, *overrides, "--run-dir", str(run_dir)]) == 0
    return str(run_dir)


@dataclass
class Steps:
    trainer: Trainer
    logs: list[dict[str, float]]  # per step: the logged values (objective parts, update phases)
    teacher_before: list[dict[str, torch.Tensor]]  # per teacher: its state before training
    grads_seen: list[bool]  # per teacher: did any teacher parameter ever hold a gradient


def train_steps(overrides: list[str], steps: int = 3, seed: int = 0) -> Steps:
    """Build a run from the default (digits) config plus `overrides` and take `steps` optimizer steps with
    `Trainer.train_step` on the run's own batches."""
    cfg = C.load_config(None, ["train.progress=false", f"seed={seed}", *overrides])
    t = Trainer(cfg)
    teachers = list(t.teachers.teachers) if t.teachers is not None else []
    before = [{k: v.clone() for k, v in teacher.state_dict().items()} for teacher in teachers]
    logs, seen = [], [False] * len(teachers)
    t.model.train()
    batches = t.epoch_batches()
    for _ in range(steps):
        logs.append({k: float(v) for k, v in t.train_step(next(batches)).items()})
        seen = [s or any(p.grad is not None for p in teacher.parameters()) for s, teacher in zip(seen, teachers)]
    return Steps(t, logs, before, seen)


def assert_teachers_untouched(s: Steps) -> None:
    """No teacher parameter ever got a gradient or requires one, and no teacher tensor (buffers included:
    BatchNorm statistics) changed."""
    assert not any(s.grads_seen)
    for t, before in zip(s.trainer.teachers.teachers, s.teacher_before):
        assert not any(p.requires_grad for p in t.parameters())
        assert not t.training and not any(m.training for m in t.modules())
        for k, v in t.state_dict().items():
            assert torch.equal(v, before[k]), f"teacher {t.name}: {k} changed"
