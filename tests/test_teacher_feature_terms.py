"""Teacher -> peer feature and relation terms (METHODS.md §2.3-2.6): AT, FSP, NST, the relation grid, SP, RKD, PKT
and CC, trained for a few real steps on digits against a cifar_resnet14 teacher.

Every term test checks that the teacher stays untouched, the loss is finite, the term alone sends gradients into
every peer (and its adapters), and the method's own invariant against a reference written here with plain
float64 torch ops from the tapped tensors. Teacher taps on 8x8 digits: stem 16x8x8, stage1 16x8x8, stage2
32x4x4, stage3 64x2x2, pre_logits 64; the default students (two cifar_resnet8) have the same shapes.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from teaching import assert_teachers_untouched, train_steps

from mutualkd.errors import UserError
from mutualkd.losses.functional import cc_rbf_taylor

WIDE = "peers=[{arch: cifar_resnet8x4}]"  # stem 32x8x8, stages 64x8x8, 128x4x4, 256x2x2, pre_logits 256


def run(teacher: str, terms: str, *extra: str, steps: int = 2):
    """Train `steps` real steps with CE + `terms` (a YAML list body) against the digits teacher."""
    return train_steps([f"teachers=[{{run: {teacher}}}]", f"objective.terms=[{{name: ce}}, {terms}]", *extra], steps)


def batch(s, seed: int = 1):
    """A fresh training batch of 64, drawn and augmented as `train_steps` does."""
    b = s.trainer
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(b.splits.train), generator=gen)[:64]
    raw = b.splits.train.__getitems__(idx.tolist())
    return b.augment(raw["image"], gen, train=True), {"target": raw["target"], "index": raw["index"]}


def forward(s, seed: int = 1):
    """(peer outputs, teacher outputs, batch dict) of one forward of the trained group on a fresh batch."""
    x, data = batch(s, seed)
    out = s.trainer.group(x, taps=s.trainer.objective.student_taps)
    return out, s.trainer.objective.teach(x, 0, 0.0), data


def check_trained(s) -> None:
    """Teachers untouched and every logged value of every step finite."""
    assert_teachers_untouched(s)
    assert all(math.isfinite(v) for logs in s.logs for v in logs.values()), s.logs


def term_backward(s, i: int):
    """Backward of term i's loss alone on a fresh batch; asserts every peer's stem got a nonzero gradient (the
    term reaches the whole backbone) and returns (term output, peer outputs, teacher outputs)."""
    b = s.trainer
    b.group.zero_grad(set_to_none=True)
    b.objective.zero_grad(set_to_none=True)
    out, teach, data = forward(s)
    parts = b.objective.terms[i](out, data, teach)
    assert torch.isfinite(parts["loss"]) and parts["per_peer"].shape == (len(b.group.peers),)
    parts["loss"].backward()
    for peer in b.group.peers:
        grads = [p.grad for p in peer.stem.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    return parts, out, teach


def trains_adapters(s, module) -> None:
    """`module`'s parameters are in the peers' optimizer and got a nonzero gradient (after `term_backward`)."""
    mine = {id(p) for p in s.trainer.objective.main_parameters()}
    params = list(module.parameters())
    assert params and all(id(p) in mine for p in params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def per_pair(out, teach, s_tap: str, t_tap: str | None = None):
    """[(student tap, teacher tap)] in float64, per peer (one teacher, index 0)."""
    t = teach.taps[0][t_tap or s_tap].double()
    return [(taps[s_tap].detach().double(), t) for taps in out.taps]


def close(actual: torch.Tensor, expected, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(actual.detach().double(), torch.as_tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=atol)


def pool_to(f: torch.Tensor, hw: int) -> torch.Tensor:
    """Average-pool a map to hw×hw by an exact integer factor (what adaptive pooling does then)."""
    return f if f.shape[-1] == hw else F.avg_pool2d(f, f.shape[-1] // hw)


def relation_mse(a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """mean over all entries of the squared difference."""
    return (a_s - a_t).pow(2).mean()


def rows(f: torch.Tensor) -> torch.Tensor:
    """[B, C, HW] channel rows, L2-normalised over space (NST)."""
    x = f.flatten(2)
    return x / x.norm(dim=2, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------------- AT


def attention(f: torch.Tensor) -> torch.Tensor:
    q = f.pow(2).mean(1).flatten(1)
    return q / q.norm(dim=1, keepdim=True)


def test_at_matches_independent_computation(digits_teacher):
    s = run(digits_teacher, "{name: at}, {name: at, paper_norm: true, taps: [stage1], teacher_taps: [stage2]}")
    check_trained(s)
    at, paper = s.trainer.objective.terms[1:]
    assert at.taps == ["stage1", "stage2", "stage3"] and at.t_taps == {0: ["stage1", "stage2", "stage3"]}
    parts, out, teach = term_backward(s, 1)
    # β·Σ_l mean_{b,hw}(Q_S − Q_T)² per peer (the weight β is applied by the objective)
    by_tap = {tap: per_pair(out, teach, tap) for tap in at.taps}
    expected = [sum(relation_mse(attention(f_s), attention(f_t)) for f_s, f_t in (by_tap[tap][p] for tap in at.taps))
                for p in range(2)]
    close(parts["per_peer"], expected)
    # paper form: ½·mean_b ‖Q_S − Q_T‖₂, the student's 16x8x8 stage1 pooled to the teacher's 32x4x4 stage2
    expected = [0.5 * (attention(pool_to(f_s, 4)) - attention(f_t)).norm(dim=1).mean()
                for f_s, f_t in per_pair(out, teach, "stage1", "stage2")]
    close(paper(out, {}, teach)["per_peer"], expected)


# -------------------------------------------------------------------------------------------------- FSP


def fsp_reference(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """G of each consecutive pair: the larger map pooled, (1/hw)·F¹ F²ᵀ per sample."""
    gs = []
    for a, b in pairwise(maps):
        hw = min(a.shape[-1], b.shape[-1])
        a, b = pool_to(a, hw).flatten(2), pool_to(b, hw).flatten(2)
        gs.append(a @ b.transpose(1, 2) / a.shape[2])
    return gs


def test_fsp_matches_independent_computation(digits_teacher):
    s = run(digits_teacher, "{name: fsp}")
    check_trained(s)
    fsp = s.trainer.objective.terms[1]
    assert fsp.taps == ["stem", "stage1", "stage2", "stage3"] and len(fsp.adapters["0_0"]) == 0
    parts, out, teach = term_backward(s, 1)
    g_t = fsp_reference([teach.taps[0][tap].double() for tap in fsp.taps])
    expected = [sum((gs - gt).pow(2).mean() for gs, gt in
                    zip(fsp_reference([taps[tap].detach().double() for tap in fsp.taps]), g_t)) for taps in out.taps]
    close(parts["per_peer"], expected)


def test_fsp_channel_mismatch_errors_and_conv1x1_adapter_fixes_it(digits_teacher):
    with pytest.raises(UserError) as err:
        run(digits_teacher, "{name: fsp}", WIDE, steps=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("objective.terms.1 (fsp)")
    assert "stem [32, 8, 8]" in msg and "stem [16, 8, 8]" in msg and "METHODS.md §2.11" in msg
    assert "adapter: conv1x1" in msg
    s = run(digits_teacher, "{name: fsp, adapter: conv1x1}", WIDE)
    check_trained(s)
    fsp = s.trainer.objective.terms[1]
    convs = fsp.adapters["0_0"]
    assert [tuple(convs[str(i)].weight.shape) for i in range(4)] == [(16, 32, 1, 1), (16, 64, 1, 1),
                                                                     (32, 128, 1, 1), (64, 256, 1, 1)]
    parts, out, teach = term_backward(s, 1)
    trains_adapters(s, convs)
    with torch.no_grad():
        adapted = [convs[str(i)](out.taps[0][tap]).double() for i, tap in enumerate(fsp.taps)]
    g_t = fsp_reference([teach.taps[0][tap].double() for tap in fsp.taps])
    close(parts["loss"], sum((gs - gt).pow(2).mean() for gs, gt in zip(fsp_reference(adapted), g_t)))


# -------------------------------------------------------------------------------------------------- NST


def test_nst_kernels_match_gram_matching_mean_gap_and_gaussian(digits_teacher):
    s = run(digits_teacher, "{name: nst}, {name: nst, tap: stage1}, {name: nst, kernel: linear}, "
                            "{name: nst, kernel: gaussian, tap: stage1, teacher_tap: stage2}")
    check_trained(s)
    terms = s.trainer.objective.terms
    assert terms[1].tap == "stage3" and terms[1].t_taps == {0: "stage3"}
    parts, out, teach = term_backward(s, 1)
    # poly (d = 2, c = 0) = Gram matching ‖TᵀT/C_t − SᵀS/C_s‖²_F per sample, batch mean; on stage3 (HW 4 < C) and
    # on stage1 (HW 64 > C 16), where nst_mmd takes its kernel path
    for term, tap in ((1, "stage3"), (2, "stage1")):
        expected = []
        for f_s, f_t in per_pair(out, teach, tap):
            S, T = rows(f_s), rows(f_t)
            gram = T.transpose(1, 2) @ T / T.shape[1] - S.transpose(1, 2) @ S / S.shape[1]
            expected.append(gram.pow(2).sum(dim=(1, 2)).mean())
        got = parts["per_peer"] if term == 1 else terms[term](out, {}, teach)["per_peer"]
        close(got, expected, rtol=1e-4)
    # linear = ‖mean_i t_i − mean_j s_j‖²
    expected = [(rows(f_t).mean(1) - rows(f_s).mean(1)).pow(2).sum(1).mean() for f_s, f_t in per_pair(out, teach, "stage3")]
    close(terms[3](out, {}, teach)["per_peer"], expected, rtol=1e-4)
    # gaussian on the student's stage1 pooled to the teacher's stage2 (4x4); σ² per sample = mean squared distance
    # over distinct pairs of the joint set of rows
    expected = []
    for f_s, f_t in per_pair(out, teach, "stage1", "stage2"):
        S, T = rows(pool_to(f_s, 4)), rows(f_t)
        joint = torch.cat([T, S], dim=1)
        n = joint.shape[1]
        sigma2 = torch.cdist(joint, joint).pow(2).sum(dim=(1, 2)) / (n * (n - 1))

        def k(a, b, sigma2=sigma2):
            return torch.exp(-torch.cdist(a, b).pow(2) / (2 * sigma2[:, None, None])).mean(dim=(1, 2))

        expected.append((k(T, T) + k(S, S) - 2 * k(S, T)).mean())
    close(terms[4](out, {}, teach)["per_peer"], expected, rtol=1e-4)


# -------------------------------------------------------------------------------------- relation family


def sp_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    def g(f):
        z = f.flatten(1)
        a = z @ z.t()
        return a / a.norm(dim=1, keepdim=True)

    return relation_mse(g(f_s), g(f_t))


def test_sp_and_relation_grid_dot_row_l2_mse_agree(digits_teacher):
    s = run(digits_teacher, "{name: sp}, {name: relation, tap: stage3, affinity: dot, normalisation: row_l2, "
                            "loss: mse, weight: 3000}")
    check_trained(s)
    assert [logs["loss/sp"] for logs in s.logs] == pytest.approx([logs["loss/relation"] for logs in s.logs])
    sp, rel = s.trainer.objective.terms[1:]
    assert sp.tap == "stage3"
    parts, out, teach = term_backward(s, 1)
    close(parts["per_peer"], [sp_reference(f_s, f_t) for f_s, f_t in per_pair(out, teach, "stage3")])
    torch.testing.assert_close(rel(out, {}, teach)["per_peer"], parts["per_peer"])


def huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


def rkd_reference(z_s: torch.Tensor, z_t: torch.Tensor, wd: float, wa: float) -> torch.Tensor:
    def dist(z):
        d = torch.cdist(z, z)
        off = ~torch.eye(len(z), dtype=torch.bool)
        return d / d[off].mean()

    def angles(z):  # [anchor j, i, k] = cos∠(z_i − z_j, z_k − z_j)
        out = []
        for j in range(len(z)):
            v = z - z[j]
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out.append(v @ v.t())
        return torch.stack(out)

    return wd * huber(dist(z_s), dist(z_t)) + wa * huber(angles(z_s), angles(z_t))


def test_rkd_matches_independent_computation(digits_teacher):
    s = run(digits_teacher, "{name: rkd}, {name: rkd, normalize: true, distance_weight: 1.0, angle_weight: 0.0}")
    check_trained(s)
    parts, out, teach = term_backward(s, 1)
    pairs = per_pair(out, teach, "pre_logits")
    close(parts["per_peer"], [rkd_reference(z_s, z_t, 25.0, 50.0) for z_s, z_t in pairs], rtol=1e-4)
    expected = [rkd_reference(F.normalize(z_s, dim=1), F.normalize(z_t, dim=1), 1.0, 0.0) for z_s, z_t in pairs]
    close(s.trainer.objective.terms[2](out, {}, teach)["per_peer"], expected, rtol=1e-4)


def test_pkt_matches_independent_computation_across_widths(digits_teacher):
    s = run(digits_teacher, "{name: pkt}", WIDE)  # student pre_logits 256 wide, teacher 64
    check_trained(s)
    parts, out, teach = term_backward(s, 1)

    def prob(z):
        zn = z / z.norm(dim=1, keepdim=True)
        a = (zn @ zn.t() + 1) / 2
        return a / a.sum(dim=1, keepdim=True)

    (z_s, z_t), = per_pair(out, teach, "pre_logits")
    p_s, p_t = prob(z_s), prob(z_t)
    close(parts["loss"], (p_t * torch.log((p_t + 1e-7) / (p_s + 1e-7))).mean(), rtol=1e-4, atol=1e-9)


def test_cc_rbf_taylor_hand_computed():
    # student rows orthogonal (cos = I), teacher rows equal (cos = 1): K = e^{−2γ}(1 + 2γ·cos + 2γ²·cos²), so the
    # off-diagonal entries differ by e^{−0.8}·(2.12 − 1) and the diagonal agrees: mse = 2·(1.12·e^{−0.8})²/4
    z_s = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    z_t = torch.tensor([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    close(cc_rbf_taylor(z_s, z_t), 0.5 * 1.12**2 * math.exp(-1.6))
    close(cc_rbf_taylor(z_s, z_t, gamma=0.4, order=0), 0.0)  # R = 0: K is the constant e^{−2γ}


def test_cc_both_forms_match_independent_computation(digits_teacher):
    s = run(digits_teacher, "{name: cc}, {name: cc, form: rbf_taylor}", WIDE)
    check_trained(s)
    cc, rbf = s.trainer.objective.terms[1:]
    assert (cc.cfg.weight, rbf.cfg.weight) == (0.02, 100.0)
    embed_s, embed_t = cc.embed_s["0_0"], cc.embed_t["0_0"]
    assert (embed_s.in_features, embed_t.in_features, embed_s.out_features) == (256, 64, 128)
    parts, out, teach = term_backward(s, 1)
    trains_adapters(s, embed_s)
    trains_adapters(s, embed_t)  # the teacher-side embedding trains too (RepDistiller)
    (z_s, z_t), = per_pair(out, teach, "pre_logits")
    e_s = F.linear(z_s, embed_s.weight.detach().double(), embed_s.bias.detach().double())
    e_t = F.linear(z_t, embed_t.weight.detach().double(), embed_t.bias.detach().double())
    delta = (e_s - e_t).abs()
    close(parts["loss"], (delta[:-1] * delta[1:]).sum(1).mean(), rtol=1e-4)

    def corr(z):
        c = F.normalize(z, dim=1) @ F.normalize(z, dim=1).t()
        return math.exp(-0.8) * (1 + 0.8 * c + 0.32 * c * c)

    close(rbf(out, {}, teach)["loss"], relation_mse(corr(z_s), corr(z_t)), rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------- shared invariants

ZERO_TERMS = ("{name: at}, {name: fsp}, {name: sp}, {name: pkt}, {name: rkd}, {name: cc}, "
              "{name: cc, form: rbf_taylor}, {name: nst}, {name: relation}")


def test_terms_are_zero_when_the_student_is_the_teacher(digits_teacher):
    # a student of the teacher's architecture holding the teacher's weights, in eval mode (BatchNorm running
    # statistics, as the teacher): its features equal the teacher's, so every term is exactly zero
    s = run(digits_teacher, ZERO_TERMS, "peers=[{arch: cifar_resnet14}]", steps=0)
    b = s.trainer
    b.group.peers[0].load_state_dict(b.teachers.teachers[0].net.peers[0].state_dict())
    cc = b.objective.terms[6]
    cc.embed_s["0_0"].load_state_dict(cc.embed_t["0_0"].state_dict())  # the same embedding on both sides
    b.group.eval()
    out, teach, data = forward(s)
    logs = b.objective(out, data, 0.0, teach)["logs"]
    labels = [label for label in b.objective.labels if label != "ce"]
    assert len(labels) == 9 and all(logs[f"loss/{label}"] == 0.0 for label in labels), logs
    b.group.train()  # batch statistics: the features now differ, and so every term is positive
    out, teach, data = forward(s)
    logs = b.objective(out, data, 0.0, teach)["logs"]
    assert all(logs[f"loss/{label}"] > 0.0 for label in labels), logs
    assert_teachers_untouched(s)


@pytest.mark.parametrize("terms, key, words", [
    ("{name: sp, tap: stage9}", "objective.terms.1.tap:",
     ["no tap 'stage9'", "logits, pre_logits, stage1, stage2, stage3, stem"]),
    ("{name: nst, teacher_tap: block7}", "objective.terms.1.teacher_tap:", ["teacher0 has no tap 'block7'"]),
    ("{name: at, taps: [stage1, stage4]}", "objective.terms.1.taps.1:", ["no tap 'stage4'", "stage3, stem"]),
    ("{name: at, teacher_taps: [stage1]}", "objective.terms.1.teacher_taps:", ["1 taps for 3 student taps"]),
    ("{name: fsp, taps: [stage1]}", "objective.terms.1.taps:", ["at least two taps"]),
    ("{name: at, taps: []}", "objective.terms.1.taps:", ["empty"]),
    ("{name: at, taps: [pre_logits]}", "objective.terms.1 (at):", ["pre_logits [64]", "METHODS.md §2.11"]),
    ("{name: nst, tap: stage1, teacher_tap: pre_logits}", "objective.terms.1 (nst):",
     ["stage1 [16, 8, 8]", "pre_logits [64]", "METHODS.md §2.11"]),
])
def test_tap_and_shape_errors_name_the_key(digits_teacher, terms, key, words):
    with pytest.raises(UserError) as err:
        run(digits_teacher, terms, steps=0)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(key), msg
    assert all(w in msg for w in words), msg


def test_terms_compute_in_fp32_under_autocast(digits_teacher):
    s = run(digits_teacher, ZERO_TERMS + ", {name: nst, kernel: gaussian}", steps=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, teach, data = forward(s)
        assert out.taps[0]["stage3"].dtype == torch.bfloat16  # the backbones do run in bf16
        parts = [term(out, data, teach)["loss"] for term in s.trainer.objective.terms[1:]]
    assert all(p.dtype == torch.float32 and torch.isfinite(p) for p in parts), parts
