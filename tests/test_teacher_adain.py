"""AdaIN statistics transfer (`adain`, METHODS.md §2.7) and activation-map adaptation (`ama`, §2.8): the pure
statistics math, real training steps on digits against a trained teacher, and the methods' invariants."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from teaching import assert_teachers_untouched, train_steps
from torch import nn

from mutualkd.errors import UserError
from mutualkd.losses import functional as MF

EPS = 1e-5
MIXED = "peers=[{arch: cifar_resnet8}, {arch: wrn_16_2}]"  # wrn_16_2: 2x the teacher's channels, same H×W


def _teacher(run: str) -> str:
    return f"teachers=[{{run: {run}}}]"


def _terms(term: str) -> str:
    return f"objective.terms=[{{name: ce}}, {term}]"


def _built(run: str, term: str, *extra: str):
    return train_steps([_teacher(run), _terms(term), *extra], steps=0).trainer


def _batch(b, n: int = 32):
    """(group output with the objective's taps, teacher output, batch dict) on the first n training images."""
    batch = b.splits.train.__getitems__(list(range(n)))
    x = b.augment(batch["image"], None, train=False)
    out = b.group(x, taps=b.objective.student_taps)
    return out, b.objective.teach(x, 0, 0.0), {"target": batch["target"], "index": batch["index"]}, x


def _params_changed(before: nn.Module, after: nn.Module) -> bool:
    a = dict(after.named_parameters())
    return all(not torch.equal(p, a[k]) for k, p in before.named_parameters())


def _stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # by hand: population variance over H×W
    f = f.float()
    mu = f.mean(dim=(2, 3))
    return mu, ((f - mu[..., None, None]) ** 2).mean(dim=(2, 3)).add(EPS).sqrt()


# ------------------------------------------------------------------------------------------- functional


def test_functional_statistics_injection_and_ablation():
    g = torch.Generator().manual_seed(0)
    f_t, f_s = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1, torch.randn(4, 3, 5, 5, generator=g)
    mu, sigma = MF.channel_stats(f_t)
    torch.testing.assert_close((mu, sigma), _stats(f_t))
    one = torch.randn(2, 3, 1, 1, generator=g)  # a 1x1 map: σ = sqrt(eps), no NaN
    torch.testing.assert_close(MF.channel_stats(one)[1], torch.full((2, 3), math.sqrt(EPS)))

    f_s.requires_grad_(True)
    f_t.requires_grad_(True)
    ada = MF.adain_inject(f_s, f_t)
    (mu_s, sig_s), (mu_t, sig_t) = _stats(f_s), _stats(f_t)
    hand = sig_s[..., None, None] * (f_t - mu_t[..., None, None]) / sig_t[..., None, None] + mu_s[..., None, None]
    torch.testing.assert_close(ada, hand)
    torch.testing.assert_close(MF.channel_stats(ada)[0], mu_s, atol=1e-5, rtol=1e-5)  # the student's μ
    ada.sum().backward()
    assert f_t.grad is None and f_s.grad is not None  # the teacher side is detached

    t = f_t.detach()
    assert torch.equal(MF.adain_inject(t.clone(), t), t)  # equal statistics: exactly the identity
    shuffled = t.flatten(2)[..., torch.randperm(25, generator=g)].view_as(t)  # same μ, σ up to rounding
    torch.testing.assert_close(MF.adain_inject(shuffled, t), t)

    ablation = MF.channel_stats_mse(f_s, t)
    torch.testing.assert_close(ablation, (mu_s - mu_t).pow(2).mean() + (sig_s - sig_t).pow(2).mean())

    with pytest.raises(ValueError, match=r"adain_inject: batch sizes or channels differ: student \(4, 2, 5, 5\) "
                                         r"vs teacher \(4, 3, 5, 5\)"):
        MF.adain_inject(torch.zeros(4, 2, 5, 5), t)
    with pytest.raises(ValueError, match=r"channel_stats: f must be \[B, C, H, W\], got shape \(4, 3\)"):
        MF.channel_stats(torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------- adain


def test_adain_trains_on_digits(digits_teacher):
    run = [_teacher(digits_teacher), _terms("{name: adain}"), MIXED]
    init, s = train_steps(run, steps=0).trainer, train_steps(run, steps=3)
    assert_teachers_untouched(s)
    term = s.trainer.objective.terms[1]
    assert term.student_taps == {"stage2", "stage3"} and term.teacher_taps == {"stage2", "stage3"}
    assert term.connectors["1_0"]["stage2"][0].weight.shape == (32, 64, 1, 1)  # wrn_16_2 64 -> teacher 32
    for log in s.logs:
        assert all(math.isfinite(v) for v in log.values())
        # weight = feat_weight = 100: the term's loss is adain + feat, and both are logged
        assert log["loss/adain"] == pytest.approx(log["adain/adain"] + log["adain/feat"], rel=1e-5)
    assert _params_changed(init.objective.terms[1], term)  # every connector parameter moved
    assert _params_changed(init.group, s.trainer.group)
    assert term.connectors["0_0"]["stage3"][1].num_batches_tracked == 3

    out, teach, data, _ = _batch(s.trainer)
    s.trainer.objective(out, data, 0.0, teach)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert all(p.grad is not None for p in s.trainer.group.parameters() if p.requires_grad)
    assert all(p.grad is None for t in s.trainer.teachers.teachers for p in t.parameters())


@pytest.mark.parametrize("head", ["next_stage", "logits"])
def test_adain_is_zero_when_statistics_match(digits_teacher, head):
    b = _built(digits_teacher, f"{{name: adain, head: {head}}}")
    term = b.objective.terms[1]
    out, teach, data, _ = _batch(b)
    real = term(out, data, teach)  # the real students: a positive, differentiable loss
    assert real["adain"] > 0 and real["feat"] > 0
    real["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in term.parameters())

    # a student whose connected map IS the teacher's: equal statistics, so F_ada = F_T and every part is 0
    for per_tap in term.connectors.values():
        for tap in per_tap:
            per_tap[tap] = nn.Identity()
    matched = SimpleNamespace(taps=[dict(teach.taps[0]) for _ in range(term.num_peers)])
    parts = term(matched, data, teach)
    assert parts["adain"].item() == 0.0 and parts["feat"].item() == 0.0 and parts["loss"].item() == 0.0


def test_adain_statistics_only_is_the_hand_ablation(digits_teacher):
    b = _built(digits_teacher, "{name: adain, statistics_only: true, weight: 10, feat_weight: 30}", MIXED)
    term = b.objective.terms[1]
    assert term.teacher_taps == {"stage2", "stage3"}  # no teacher remainder: no next-stage taps
    out, teach, data, _ = _batch(b)
    parts = term(out, data, teach)
    adain, feat = [], []
    for p in range(2):
        conn = term.connectors[f"{p}_0"]
        r2, r3 = conn["stage2"](out.taps[p]["stage2"]), conn["stage3"](out.taps[p]["stage3"])
        one = 0.0
        for r, f_t in ((r2, teach.taps[0]["stage2"]), (r3, teach.taps[0]["stage3"])):
            (mu_s, sig_s), (mu_t, sig_t) = _stats(r), _stats(f_t)
            one = one + ((mu_s - mu_t) ** 2).mean() + ((sig_s - sig_t) ** 2).mean()
        adain.append(one)
        feat.append(((r3 - teach.taps[0]["stage3"]) ** 2).mean())
    torch.testing.assert_close(parts["adain"], sum(adain))
    torch.testing.assert_close(parts["feat"], sum(feat))
    torch.testing.assert_close(parts["loss"], sum(adain) + 3.0 * sum(feat))  # weight·loss = 10·adain + 30·feat
    torch.testing.assert_close(parts["per_peer"], torch.stack(adain) + 3.0 * torch.stack(feat))


def test_adain_teacher_taps_pair_different_stages(digits_teacher):
    """cifar_vgg8's stage2 (256x2x2) pairs with the teacher's last stage (64x2x2), whose next module is the head:
    the next_stage loss then targets the teacher's logits."""
    b = _built(digits_teacher, "{name: adain, taps: [stage2], teacher_taps: [stage3]}", "peers=[{arch: cifar_vgg8}]")
    term = b.objective.terms[1]
    assert term.taps == [("stage2", {0: "stage3"})] and term.next_taps == [{0: None}]
    assert term.student_taps == {"stage2"} and term.teacher_taps == {"stage3"}
    out, teach, data, _ = _batch(b)
    parts = term(out, data, teach)
    r = term.connectors["0_0"]["stage2"](out.taps[0]["stage2"])
    z = b.teachers.teachers[0].remainder("stage3", MF.adain_inject(r, teach.taps[0]["stage3"]), "logits")
    torch.testing.assert_close(parts["adain"], ((z - teach.logits[0]) ** 2).mean())
    with pytest.raises(UserError, match=r"^objective\.terms\.1\.teacher_taps: 2 taps for the students' 1"):
        _built(digits_teacher, "{name: adain, taps: [stage3], teacher_taps: [stage2, stage3]}")


def test_adain_build_errors(digits_teacher):
    with pytest.raises(UserError) as err:  # mobilenetv2 stage2 is 16x2x2, the teacher's 32x4x4
        _built(digits_teacher, "{name: adain, taps: [stage2]}", "peers=[{arch: mobilenetv2}]")
    msg = str(err.value)
    assert "\n" not in msg and "[16, 2, 2]" in msg and "[32, 4, 4]" in msg and "METHODS.md §2.11" in msg
    assert msg.startswith("objective.terms.1 (adain)")
    with pytest.raises(UserError, match=r"^objective\.terms\.1\.taps: .*no tap 'nope'"):
        _built(digits_teacher, "{name: adain, taps: [nope]}")
    with pytest.raises(UserError, match=r"^objective\.terms\.1\.taps: .*distinct"):
        _built(digits_teacher, "{name: adain, taps: [stage3, stage3]}")
    with pytest.raises(UserError, match=r"^objective\.terms\.1\.weight: 0"):
        _built(digits_teacher, "{name: adain, weight: 0}")


# ------------------------------------------------------------------------------------------------ ama


def test_ama_trains_on_digits(digits_teacher):
    run = [_teacher(digits_teacher), _terms("{name: ama, module_kd_weight: 0.5}"), MIXED]
    init, s = train_steps(run, steps=0).trainer, train_steps(run, steps=3)
    assert_teachers_untouched(s)  # no teacher tensor (BN statistics included) changed
    term = s.trainer.objective.terms[1]
    assert (term.front, term.split) == ("stage2", "stage3")  # k = the middle stage; M_φ replaces stage 3
    assert term.phi["1_0"][0].weight.shape == (128, 32, 3, 3)  # width student: wrn_16_2's stage-3 channels
    for log in s.logs:
        assert all(math.isfinite(v) for v in log.values())
        module = log["ama/module_ce"] + 0.5 * log["ama/module_kd"]
        assert log["loss/ama"] == pytest.approx(log["ama/hint"] + module / 100.0, rel=1e-5)
    before = init.objective.terms[1]
    assert _params_changed(before.phi, term.phi) and _params_changed(before.regressors, term.regressors)
    assert _params_changed(init.group, s.trainer.group)


def test_ama_student_and_module_gradients_are_disjoint(digits_teacher):
    b = _built(digits_teacher, "{name: ama, module_kd_weight: 1.0}")
    term = b.objective.terms[1]
    out, teach, data, _ = _batch(b)
    parts = term(out, data, teach)
    phi, student = list(term.phi.parameters()), list(term.regressors.parameters()) + list(b.group.parameters())

    def grads(loss, params):
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    assert all(g is None for g in grads(parts["hint"], phi))  # A is detached in the student's hint
    assert all(g is not None for g in grads(parts["hint"], list(term.regressors.parameters())))
    module = parts["module_ce"] + parts["module_kd"]
    assert all(g is None for g in grads(module, student))  # M_φ's losses never reach the student
    assert all(g is not None and g.abs().sum() > 0 for g in grads(module, phi))
    parts["loss"].backward()
    assert all(p.grad is None for p in b.teachers.teachers[0].parameters())
    torch.testing.assert_close(parts["loss"], parts["hint"] + module / 100.0)


@pytest.mark.parametrize("k", [1, 2])
def test_ama_split_reproduces_the_teacher(digits_teacher, k):
    """With M_φ replaced by the teacher's real stage k+1, A is the teacher's stage-(k+1) map and T_back(A) its
    logits: the split, the detached front and the remainder are wired to the right stages."""
    b = _built(digits_teacher, f"{{name: ama, stage: {k}}}")
    term, teacher = b.objective.terms[1], b.teachers.teachers[0]
    _, teach, _, x = _batch(b)
    stage = next(name for name, label in teacher.plan() if label == f"stage{k + 1}")
    term.phi["0_0"] = teacher.net.peers[0].get_submodule(stage)
    a, z = term.adapted(0, 0, teach)
    logits, taps = teacher(x, taps=[f"stage{k + 1}"])
    torch.testing.assert_close(a, taps[f"stage{k + 1}"])
    torch.testing.assert_close(z, logits)
    torch.testing.assert_close(z, teach.logits[0])


def test_ama_build_errors(digits_teacher):
    with pytest.raises(UserError, match=r"^objective\.terms\.1\.stage: 3 leaves no stage k\+1 .*allowed 1\.\.2$"):
        _built(digits_teacher, "{name: ama, stage: 3}")
    with pytest.raises(UserError, match=r"^objective\.terms\.1\.module_ce_weight: .*never be trained"):
        _built(digits_teacher, "{name: ama, module_ce_weight: 0}")
