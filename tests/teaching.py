"""Shared pieces of the teacher-term tests: a digits teacher trained with mutualkd, and a few real training
steps of a student group built by the engine (build + the same step as the trainer), returning everything a
test needs to check gradients, teacher invariance and the logged parts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mutualkd import config as C
from mutualkd.cli import main
from mutualkd.engine.optim import build_optimizer
from mutualkd.engine.trainer import Built, build, make_accelerator, seed_everything

# A teacher on digits: one cifar_resnet14 peer (3 stages: 16x8x8, 32x4x4, 64x2x2 on 8x8 inputs), CE only.
TEACHER = ["peers=[{arch: cifar_resnet14}]", "objective.terms=[{name: ce}]", "train.epochs=2",
           "train.progress=false"]


def train_teacher(run_dir, *overrides) -> str:
    assert main(["train", *TEACHER, *overrides, "--run-dir", str(run_dir)]) == 0
    return str(run_dir)


@dataclass
class Steps:
    built: Built
    logs: list[dict[str, float]]  # per step: the objective's logged parts
    teacher_before: list[dict[str, torch.Tensor]]  # per teacher: its state before training
    grads_seen: list[bool]  # per teacher: did any teacher parameter ever hold a gradient


def train_steps(overrides: list[str], steps: int = 3, seed: int = 0) -> Steps:
    """Build students + teachers from the default (digits) config plus `overrides` and take `steps` optimizer
    steps exactly as the trainer does (forward with taps, teachers, objective, backward, after_backward, step)."""
    cfg = C.load_config(None, ["train.progress=false", f"seed={seed}", *overrides])
    acc = make_accelerator(cfg)
    seed_everything(cfg.seed, cfg.train.deterministic)
    b = build(cfg, acc)
    teachers = list(b.teachers.teachers) if b.teachers is not None else []
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    extras = b.objective.main_parameters()
    opt = build_optimizer(list(b.group.parameters()) + extras, cfg.train)
    gen = torch.Generator().manual_seed(seed)
    train = b.splits.train
    logs, seen = [], [False] * len(teachers)
    b.group.train()
    b.objective.train()
    for step in range(steps):
        idx = torch.randperm(len(train), generator=gen)[: cfg.data.batch_size]
        batch = train.__getitems__(idx.tolist())
        x = b.augment(batch["image"], gen, train=True)
        data = {"target": batch["target"], "index": batch["index"], "input": x}
        out = b.group(x, taps=b.objective.student_taps)
        teach = b.objective.teach(x, step, 0.0)
        losses = b.objective(out, data, 0.0, teach)
        losses["loss"].backward()
        b.objective.after_backward()
        seen = [s or any(p.grad is not None for p in t.parameters()) for s, t in zip(seen, teachers)]
        opt.step()
        opt.zero_grad(set_to_none=True)
        logs.append({k: float(v) for k, v in losses["logs"].items()})
    return Steps(b, logs, before, seen)


def assert_teachers_untouched(s: Steps) -> None:
    """No teacher parameter ever got a gradient or requires one, and no teacher tensor (buffers included:
    BatchNorm statistics) changed."""
    assert not any(s.grads_seen)
    for t, before in zip(s.built.teachers.teachers, s.teacher_before):
        assert not any(p.requires_grad for p in t.parameters())
        assert not t.training and not any(m.training for m in t.modules())
        for k, v in t.state_dict().items():
            assert torch.equal(v, before[k]), f"teacher {t.name}: {k} changed"
