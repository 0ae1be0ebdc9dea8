"""The trainer's one step: the benchmark times exactly it, DML's alternating updates are the paper's Algorithm 1,
the state object round-trips through checkpoints, and `mutualkd eval` builds only what it evaluates."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mutualkd import config as C
from mutualkd.cli import main
from mutualkd.data import TrainBatchSampler
from mutualkd.engine import checkpoint
from mutualkd.engine.trainer import PHASES, Trainer, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder of the repository

from benchmarks.harness import Runner, StepTimer  # noqa: E402

QUIET = ["train.progress=false"]
# Every kind of per-step work: per-peer views, dropout (global RNG), memory banks with their sampler (after-step
# hook), a teacher with an adapter, and a discriminator phase with its own optimizer.
STATEFUL = [*QUIET, "data.views=shared", "peers.0.model_kwargs={drop_rate: 0.3}", "embedding.head=linear",
            "embedding.dim=16", "train.clip_grad_norm=5.0"]


def stateful(teacher: str) -> list[str]:
    return [*STATEFUL, f"teachers=[{{run: {teacher}}}]",
            "objective.terms=[{name: ce}, {name: dml}, {name: mcl_okd, K: 32}, {name: kd}, {name: fitnet}, "
            "{name: complementary}]"]


def test_the_benchmark_times_the_trainers_own_step(tmp_path, digits_teacher):
    """From the same config, N harness steps and N steps of `mutualkd train` give identical weights, objective
    state (banks, adapters, discriminators) and discriminator optimizer state."""
    args = stateful(digits_teacher)
    n = 4
    runner = Runner("group", C.load_config(None, args))
    timer = StepTimer(torch.device("cpu"))
    runner.run(n, timer, 0)
    assert len(runner.records) == n and set(PHASES) <= set(runner.records[0])
    assert all(r["forward"] > 0 and r["optimizer"] > 0 for r in runner.records)
    train(C.load_config(None, [*args, f"train.max_steps={n}"]), tmp_path / "run")
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    t = runner.trainer
    assert saved["step"] == t.state.step == n
    for name, tensor in t.group.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    for name, tensor in t.objective.state_dict().items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, saved["objective"][name]), name
    (label, phase), = t.objective.phases
    mine, theirs = phase.optimizer.state_dict()["state"], saved["phases"][f"{label}/{phase.name}"]["state"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k]["exp_avg"], theirs[k]["exp_avg"]) for k in mine)


def test_train_step_reports_every_phase_and_returns_the_steps_logs(digits_teacher):
    t = Trainer(C.load_config(None, stateful(digits_teacher)))
    marks = []
    logs = t.train_step(next(t.epoch_batches()), mark=marks.append)
    assert marks == ["data", "forward", "losses", "backward", "optimizer", "losses"]
    assert {"loss", "loss/ce", "loss/mcl_okd", "fitnet/peer1", "complementary/discriminator"} <= set(logs)
    assert all(not v.requires_grad for v in logs.values())
    assert t.state.step == 1 and t.state.batch == 1 and t.state.n_logged == 1
    torch.testing.assert_close(t.state.sums["loss"], logs["loss"])


def test_resume_restores_the_log_interval_exactly(tmp_path):
    """A run stopped between two log lines continues the interval: its metrics equal an uninterrupted run's."""
    args = [*QUIET, "train.epochs=1", "train.log_every=4"]
    full = tmp_path / "full"
    train(C.load_config(None, args), full)
    part = tmp_path / "part"
    train(C.load_config(None, [*args, "train.max_steps=6"]), part)  # stops 2 steps into an interval
    assert main(["train", "--resume", str(part)]) == 0
    lines = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, part)]
    strip = [[{k: v for k, v in rec.items() if k != "wall_time_s"} for rec in recs] for recs in lines]
    assert strip[0] == strip[1] and any("train" in rec for rec in strip[0])


# ------------------------------------------------------------------------------------ DML alternating
ALT = [*QUIET, "data.augment=false", "peers=[{arch: cifar_resnet8}, {arch: cifar_resnet8}, {arch: cifar_resnet8}]"]


def algorithm_1(models: list[torch.nn.Module], trainer: Trainer, steps: int) -> None:
    """The DML paper's Algorithm 1, written out: per mini-batch, for each network k in turn, all networks
    predict with their current weights, then network k alone takes a step on CE + the mean KL toward the
    others' detached predictions. One SGD per network, as the official code; lr from a cosine schedule."""
    cfg = trainer.cfg
    o, spec = cfg.train.optimizer, trainer.splits.spec
    opts = [torch.optim.SGD(m.parameters(), lr=o.lr, momentum=o.momentum, nesterov=True,
                            weight_decay=o.weight_decay) for m in models]
    sampler = TrainBatchSampler(trainer.splits.train.targets, cfg.data.batch_size, seed=cfg.seed)
    sampler.set_epoch(0)
    per_epoch = len(sampler)
    mean, std = spec.mean[0], spec.std[0]
    for step, idx in zip(range(steps), sampler):
        x = (trainer.splits.train.images[idx].float() / 255 - mean) / std
        y = trainer.splits.train.targets[idx]
        lr = o.lr * 0.5 * (1 + math.cos(math.pi * min(step / per_epoch / cfg.train.epochs, 1.0)))
        for k in range(len(models)):
            with torch.no_grad():
                others = {j: m(x) for j, m in enumerate(models) if j != k}
            z = models[k](x)
            kl = sum(F.kl_div(F.log_softmax(z, 1), F.softmax(t, 1), reduction="batchmean") for t in others.values())
            loss = F.cross_entropy(z, y) + kl / (len(models) - 1)
            for g in opts[k].param_groups:
                g["lr"] = lr
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()


@pytest.mark.parametrize("mode", ["alternating", "synchronous"])
def test_alternating_dml_is_the_papers_algorithm_1(mode):
    t = Trainer(C.load_config(None, [*ALT, f"objective.terms=[{{name: ce}}, {{name: dml, update_mode: {mode}}}]"]))
    models = [copy.deepcopy(m) for m in t.group.peers]
    steps, batches = 3, t.epoch_batches()
    for _ in range(steps):
        t.train_step(next(batches))
    algorithm_1(models, t, steps)
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for m, ref in zip(t.group.peers, models)
               for a, b in zip(m.state_dict().values(), ref.state_dict().values()) if a.is_floating_point())
    assert same == (mode == "alternating")  # the synchronous update is measurably another algorithm


def test_alternating_steps_one_peer_per_phase_and_uses_its_predecessors_new_predictions(monkeypatch):
    t = Trainer(C.load_config(None, [*ALT, "objective.terms=[{name: ce}, {name: dml, update_mode: alternating}]"]))
    assert t.objective.peer_updates(0.0) == [[0], [1], [2]]
    seen = []
    forward = t.group.forward

    def record(*args, live=None, **kwargs):
        out = forward(*args, live=live, **kwargs)
        seen.append((live, [bool(z.requires_grad) for z in out.logits.unbind(0)],
                     [p.detach().clone() for p in (t.group.peers[0].get_classifier().weight,)]))
        return out

    monkeypatch.setattr(t.group, "forward", record)
    marks = []
    t.train_step(next(t.epoch_batches()), mark=marks.append)
    assert [live for live, _, _ in seen] == [[0], [1], [2]]
    assert marks.count("optimizer") == 3 and marks.count("forward") == 3 and t.state.step == 1
    # peer 0 stepped before peer 1's phase: its weights (and so its predictions) differ from the first phase's
    assert not torch.equal(seen[0][2][0], seen[1][2][0]) and torch.equal(seen[1][2][0], seen[2][2][0])


@pytest.mark.parametrize("overrides, culprit", [
    (["topology.kind=shared_stem"], "a shared stem belongs to every peer"),
    (["train.grad_accum=2"], "use train.grad_accum=1"),
    (["placement=peer_parallel"], "use placement=data_parallel"),
])
def test_alternating_refuses_what_it_cannot_do(overrides, culprit):
    with pytest.raises(C.UserError, match=rf"objective\.terms\.1\.update_mode: alternating: .*{culprit}"):
        C.load_config(None, ["objective.terms=[{name: ce}, {name: dml, update_mode: alternating}]", *overrides])


# ----------------------------------------------------------------------------------------- eval
def test_eval_builds_only_the_peers_and_the_data(tmp_path, digits_teacher, capsys):
    """A KD run's evaluation needs neither its teacher nor its objective: it still works when the teacher's run
    directory is gone (building the whole run, as before, would load the teacher)."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(digits_teacher, teacher)
    run = tmp_path / "run"
    assert main(["train", *QUIET, "train.epochs=1", f"teachers=[{{run: {teacher}}}]",
                 "objective.terms=[{name: ce}, {name: kd}, {name: fitnet}]", "--run-dir", str(run)]) == 0
    shutil.rmtree(teacher)
    capsys.readouterr()
    assert main(["eval", str(run), "--checkpoint", "last", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert result["test"]["top1"] == [p["final_test_top1"] for p in summary["peers"]]
