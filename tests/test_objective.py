"""Behaviour tests of the objective's terms (ce, dml, dot, mcl, mcl_okd) and of `Objective` itself.

References are naive and written from METHODS.md (§0.2, §0.5, §1.1, §1.6, §1.7): explicit Python loops over
peers, ordered pairs, samples and candidates, float64 math, and the detached (sg) targets the spec prescribes.
They never call `mutualkd.losses.functional`. Gradients are compared against the reference's gradient, so the
stop-gradient policy is checked, not only the value.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mutualkd.config import ObjectiveConfig, Ramp
from mutualkd.errors import UserError
from mutualkd.losses import mcl_okd
from mutualkd.losses.base import BuildContext
from mutualkd.losses.ce import CEConfig as CETerm
from mutualkd.losses.dml import DMLConfig as DMLTerm
from mutualkd.losses.dot import DOTConfig as DOTTerm
from mutualkd.losses.mcl import MCLConfig as MCLTerm
from mutualkd.losses.mcl_okd import MCLOKDConfig as MCLOKDTerm
from mutualkd.losses.objective import Objective, ramp_factor
from mutualkd.peers import GroupOutput
from mutualkd.registry import TERMS

KEY = "objective.terms.0"


# ------------------------------------------------------------------------------------------------ helpers


def rnd(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def unit(*shape, seed=0):
    return F.normalize(rnd(*shape, seed=seed), dim=-1)


def ctx_for(P, C=5, embedding_dim=None, train_targets=None, seed=0):
    if train_targets is None:
        train_targets = torch.arange(20) % C
    return BuildContext(
        peer_names=[f"peer{i}" for i in range(P)],
        num_classes=C,
        train_targets=train_targets,
        embedding_dim=embedding_dim,
        seed=seed,
    )


def build(cfg, ctx, key=KEY):
    return TERMS.get(cfg.name).term(cfg, ctx, key)


def output(logits=None, embeddings=None):
    ref = logits if logits is not None else embeddings
    return GroupOutput(logits=logits, pre_logits=[None] * ref.shape[0], embeddings=embeddings)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(
        actual.detach().double(), torch.as_tensor(expected).detach().double(), rtol=rtol, atol=atol
    )


def leaf64(x):
    return x.detach().double().requires_grad_(True)


# ------------------------------------------------------------------------------------ naive references


def ref_log_softmax(row):
    """log softmax of a 1-D float64 tensor, written out (max shift, log of the sum of exps)."""
    m = row.max().detach()
    e = [torch.exp(x - m) for x in row]
    return row - m - torch.log(sum(e))


def ref_kl(target_row, student_row, T):
    """KL(softmax(target/T) ‖ softmax(student/T)) for one sample; the caller detaches the target."""
    log_q = ref_log_softmax(target_row / T)
    log_p = ref_log_softmax(student_row / T)
    return sum(log_q[c].exp() * (log_q[c] - log_p[c]) for c in range(len(target_row)))


def ref_kd(student, target, T):
    """KD_T(target → student) = T²·(1/B)·Σ_b KL(softmax(sg target_b/T) ‖ softmax(student_b/T))."""
    B = student.shape[0]
    return T * T * sum(ref_kl(target[b].detach(), student[b], T) for b in range(B)) / B


def ref_ce(z, y, eps):
    """Per peer, mean over the batch of −Σ_c q_c log p_c with q = (1−eps)·onehot + eps/C."""
    P, B, C = z.shape
    out = []
    for p in range(P):
        total = 0.0
        for b in range(B):
            log_p = ref_log_softmax(z[p, b])
            for c in range(C):
                q = (1 - eps) * (1.0 if c == int(y[b]) else 0.0) + eps / C
                total = total - q * log_p[c]
        out.append(total / B)
    return torch.stack(out)


def ref_dml(z, T, rho):
    """Per peer i: ρ·Σ_{j≠i} KD_T(z_j → z_i) (§1.1), targets detached."""
    P = z.shape[0]
    return torch.stack([rho * sum(ref_kd(z[i], z[j], T) for j in range(P) if j != i) for i in range(P)])


def ref_supcon(va, vb, y, tau, self_positive=False):
    """ℓ(S) of §1.7 with S = V_a V_bᵀ/τ: anchors u from va, candidates k from vb; anchors w/o positive skipped."""
    B = len(y)
    per_anchor = []
    for u in range(B):
        den = [k for k in range(B) if self_positive or k != u]
        pos = [w for w in range(B) if y[w] == y[u] and (self_positive or w != u)]
        if not pos:
            continue
        s = [torch.dot(va[u], vb[k]) / tau for k in range(B)]
        lse = torch.logsumexp(torch.stack([s[k] for k in den]), 0)
        per_anchor.append(sum(s[w] - lse for w in pos) / len(pos))
    return -sum(per_anchor) / len(per_anchor)


def ref_soft(student, target, T, tau, t2=True):
    """T²·(1/B)·Σ_u KL(sg softmax_{k≠u}(S^t_uk/T) ‖ softmax_{k≠u}(S^s_uk/T)); pairs are (anchor V, contrast V)."""
    (sa, sb), (ta, tb) = student, (target[0].detach(), target[1].detach())
    B = sa.shape[0]
    total = 0.0
    for u in range(B):
        ks = [k for k in range(B) if k != u]
        log_p = ref_log_softmax(torch.stack([torch.dot(sa[u], sb[k]) / tau / T for k in ks]))
        log_q = ref_log_softmax(torch.stack([torch.dot(ta[u], tb[k]) / tau / T for k in ks]))
        total = total + sum(log_q[n].exp() * (log_q[n] - log_p[n]) for n in range(len(ks)))
    return total / B * (T * T if t2 else 1.0)


def ref_mcl(V, y, cfg):
    """§1.7 totals: per network a, α·VCL_a + ρ·Σ_{b≠a}[β·ICL_ab + γ·SoftVCL_{a←b} + λ·SoftICL_{a←b}]."""
    P = V.shape[0]
    rho = 1.0 / (P - 1) if cfg.pair_reduction == "mean" else 1.0
    y = [int(t) for t in y]
    per_peer, parts = [], {"vcl": 0.0, "icl": 0.0, "soft_vcl": 0.0, "soft_icl": 0.0}
    for a in range(P):
        vcl = ref_supcon(V[a], V[a], y, cfg.tau)  # within-network: never a self positive
        total = cfg.vcl * vcl
        parts["vcl"] = parts["vcl"] + vcl
        for b in range(P):
            if b == a:
                continue
            icl = ref_supcon(V[a], V[b], y, cfg.tau, cfg.icl_self_positive)
            svcl = ref_soft((V[a], V[a]), (V[b], V[b]), cfg.T, cfg.tau, cfg.soft_t2)
            sicl = ref_soft((V[a], V[b]), (V[b], V[a]), cfg.T, cfg.tau, cfg.soft_t2)
            total = total + rho * (cfg.icl * icl + cfg.soft_vcl * svcl + cfg.soft_icl * sicl)
            parts["icl"] = parts["icl"] + rho * icl
            parts["soft_vcl"] = parts["soft_vcl"] + rho * svcl
            parts["soft_icl"] = parts["soft_icl"] + rho * sicl
        per_peer.append(total)
    per_peer = torch.stack(per_peer)
    return per_peer.sum(), per_peer, parts


def ref_nce_pair(bank_i, v_j, rows_idx, tau, N, eps):
    """CRD-form NCE of peer j's embeddings against peer i's (pre-update, detached) bank rows (§1.6)."""
    B, K = rows_idx.shape[0], rows_idx.shape[1] - 1
    s = [[torch.exp(torch.dot(bank_i[int(rows_idx[b, k])], v_j[b]) / tau) for k in range(K + 1)] for b in range(B)]
    Z = (sum(sum(row) for row in s) / (B * (K + 1))).detach() * N
    k_pi = K / N
    total = 0.0
    for b in range(B):
        p0 = s[b][0] / Z
        total = total + torch.log(p0 / (p0 + k_pi + eps))
        for k in range(1, K + 1):
            pk = s[b][k] / Z
            total = total + torch.log(k_pi / (pk + k_pi + eps))
    return -total / B


# -------------------------------------------------------------------------------------------------- ce


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_ce_sums_peer_means_with_label_smoothing(smoothing):
    P, B, C = 3, 6, 5
    z = rnd(P, B, C, seed=1, scale=2.0).requires_grad_(True)
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    term = build(CETerm(name="ce", label_smoothing=smoothing), ctx_for(P, C))
    res = term(output(logits=z), {"target": y})
    z64 = leaf64(z)
    expected = ref_ce(z64, y, smoothing)
    close(res["per_peer"], expected)
    close(res["loss"], expected.sum())
    res["loss"].backward()
    expected.sum().backward()
    close(z.grad, z64.grad)


def test_ce_per_peer_values_are_logged_under_peer_names():
    P, B, C = 2, 4, 3
    z = rnd(P, B, C, seed=2)
    y = torch.tensor([0, 1, 2, 1])
    obj = Objective(ObjectiveConfig(terms=[CETerm(name="ce", label_smoothing=0.1)]), ctx_for(P, C))
    res = obj(output(logits=z), {"target": y}, epoch=0.0)
    expected = ref_ce(z.double(), y, 0.1)
    close(res["logs"]["ce/peer0"], expected[0])
    close(res["logs"]["ce/peer1"], expected[1])
    close(res["logs"]["loss/ce"], expected.sum())


# ------------------------------------------------------------------------------------------------- dml


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dml_value_and_gradient(P, T, reduction):
    B, C = 5, 4
    z = rnd(P, B, C, seed=10 + P, scale=2.0).requires_grad_(True)
    term = build(DMLTerm(name="dml", T=T, reduction=reduction), ctx_for(P, C))
    res = term(output(logits=z), {"target": torch.zeros(B, dtype=torch.long)})
    rho = 1.0 / (P - 1) if reduction == "mean" else 1.0
    z64 = leaf64(z)
    expected = ref_dml(z64, T, rho)
    close(res["per_peer"], expected)
    close(res["loss"], expected.sum())
    # the gradient equals the reference's, whose targets are detached
    res["loss"].backward()
    expected.sum().backward()
    close(z.grad, z64.grad)


def test_dml_peer_loss_sends_gradient_only_into_its_own_logits():
    P, B, C = 3, 4, 5
    z = rnd(P, B, C, seed=3).requires_grad_(True)
    term = build(DMLTerm(name="dml", T=2.0), ctx_for(P, C))
    per_peer = term(output(logits=z), {"target": torch.zeros(B, dtype=torch.long)})["per_peer"]
    for i in range(P):
        (g,) = torch.autograd.grad(per_peer[i], z, retain_graph=True)
        for j in range(P):
            if j == i:
                assert g[j].abs().sum() > 0
            else:
                assert torch.equal(g[j], torch.zeros_like(g[j])), (i, j)


# ------------------------------------------------------------------------------------------------- dot


@pytest.mark.parametrize("targets", ["last", "all"])
@pytest.mark.parametrize("P", [2, 4])
def test_dot_distils_toward_detached_mean_logits(targets, P):
    B, C, T = 6, 5, 3.0
    z = rnd(P, B, C, seed=20 + P, scale=3.0).requires_grad_(True)
    term = build(DOTTerm(name="dot", T=T, targets=targets), ctx_for(P, C))
    res = term(output(logits=z), {"target": torch.zeros(B, dtype=torch.long)})
    z64 = leaf64(z)
    ensemble = sum(z64[p] for p in range(P)).detach() / P  # the mean includes the student
    per_peer = torch.stack([ref_kd(z64[p], ensemble, T) for p in range(P)])
    expected = per_peer[-1] if targets == "last" else per_peer.sum()
    close(res["loss"], expected)
    res["loss"].backward()
    expected.backward()
    close(z.grad, z64.grad)
    if targets == "last":  # the ensemble is detached: no gradient reaches the other peers
        assert torch.equal(z.grad[:-1], torch.zeros_like(z.grad[:-1]))


# ------------------------------------------------------------------------------------------------- mcl

LABELS8 = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4])  # classes 3 and 4 have no in-batch positive


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tau": 0.5, "T": 2.0, "vcl": 0.3, "icl": 0.7, "soft_vcl": 1.3, "soft_icl": 0.9},
        {"tau": 0.3, "vcl": 0.2, "icl": 0.4, "soft_vcl": 0.6, "soft_icl": 1.1, "pair_reduction": "sum"},
        {"tau": 0.2, "T": 4.0, "soft_t2": False},
        {"tau": 0.3, "vcl": 0.5, "icl": 0.8, "icl_self_positive": True},
    ],
    ids=["defaults", "weights", "sum", "no_t2", "self_positive"],
)
def test_mcl_matches_reference(P, overrides):
    B, d = 8, 6
    cfg = MCLTerm(name="mcl", **overrides)
    V = unit(P, B, d, seed=30 + P).requires_grad_(True)
    term = build(cfg, ctx_for(P, embedding_dim=d))
    res = term(output(embeddings=V), {"target": LABELS8})
    V64 = leaf64(V)
    total, per_peer, parts = ref_mcl(V64, LABELS8, cfg)
    close(res["loss"], total, rtol=2e-5)
    close(res["per_peer"], per_peer, rtol=2e-5)
    for name, value in parts.items():
        close(res[name], value, rtol=2e-5)
    # the logged parts are the unweighted pieces of the total
    weighted = cfg.vcl * res["vcl"] + cfg.icl * res["icl"] + cfg.soft_vcl * res["soft_vcl"] + cfg.soft_icl * res["soft_icl"]
    close(weighted, res["loss"], rtol=2e-5)
    # gradient: flows through VCL, ICL and the soft students, never through the soft targets
    res["loss"].backward()
    total.backward()
    assert torch.isfinite(V.grad).all()
    close(V.grad, V64.grad, rtol=1e-4, atol=1e-5)


def _mcl_only(**weights):
    base = {"vcl": 0.0, "icl": 0.0, "soft_vcl": 0.0, "soft_icl": 0.0}
    return MCLTerm(name="mcl", tau=0.3, **{**base, **weights})


@pytest.mark.parametrize(
    "weights, partner_gets_gradient",
    [({"icl": 1.0}, True), ({"soft_vcl": 1.0}, False), ({"vcl": 1.0}, False)],
)
def test_mcl_gradient_into_partner_network(weights, partner_gets_gradient):
    """Network 0's loss reaches network 1 through ICL, but not through soft VCL's detached target."""
    P, B, d = 2, 8, 5
    V = unit(P, B, d, seed=40).requires_grad_(True)
    term = build(_mcl_only(**weights), ctx_for(P, embedding_dim=d))
    per_peer = term(output(embeddings=V), {"target": LABELS8})["per_peer"]
    (g,) = torch.autograd.grad(per_peer[0], V)
    assert g[0].abs().sum() > 0
    assert (g[1].abs().sum() > 0) == partner_gets_gradient


def test_mcl_soft_icl_target_is_detached():
    """Soft ICL_{0←1} = KL(sg r^{10} ‖ r^{01}): only the student row r^{01} carries gradient (into both nets)."""
    P, B, d, T, tau = 2, 8, 5, 3.0, 0.3
    V = unit(P, B, d, seed=41).requires_grad_(True)
    term = build(_mcl_only(soft_icl=1.0), ctx_for(P, embedding_dim=d))
    per_peer = term(output(embeddings=V), {"target": LABELS8})["per_peer"]
    (g,) = torch.autograd.grad(per_peer[0], V)
    V64 = leaf64(V)
    expected = ref_soft((V64[0], V64[1]), (V64[1], V64[0]), T, tau)
    close(per_peer[0], expected)
    (g_ref,) = torch.autograd.grad(expected, V64)
    close(g, g_ref, rtol=1e-4, atol=1e-6)
    # a reference without the stop-gradient has a different gradient, so the check above is discriminating
    r01 = [V64[0], V64[1]]
    undetached = 0.0
    for u in range(B):
        ks = [k for k in range(B) if k != u]
        log_p = ref_log_softmax(torch.stack([torch.dot(r01[0][u], r01[1][k]) / tau / T for k in ks]))
        log_q = ref_log_softmax(torch.stack([torch.dot(r01[1][u], r01[0][k]) / tau / T for k in ks]))
        undetached = undetached + (log_q.exp() * (log_q - log_p)).sum()
    (g_bad,) = torch.autograd.grad(undetached / B * T * T, V64)
    assert not torch.allclose(g_bad, g_ref, rtol=1e-3, atol=1e-5)


def test_mcl_self_positive_changes_icl_only():
    """icl_self_positive adds the same instance seen by the other network to ICL; VCL never self-contrasts."""
    P, B, d = 2, 8, 5
    V = unit(P, B, d, seed=42)
    y = LABELS8
    kw = {"tau": 0.3, "vcl": 1.0, "icl": 1.0}
    off = build(MCLTerm(name="mcl", **kw), ctx_for(P, embedding_dim=d))(output(embeddings=V), {"target": y})
    on = build(MCLTerm(name="mcl", icl_self_positive=True, **kw), ctx_for(P, embedding_dim=d))(
        output(embeddings=V), {"target": y}
    )
    close(on["vcl"], off["vcl"])
    V64 = V.double()
    yl = [int(t) for t in y]
    close(on["icl"], ref_supcon(V64[0], V64[1], yl, 0.3, True) + ref_supcon(V64[1], V64[0], yl, 0.3, True))
    assert not torch.allclose(on["icl"], off["icl"])


# --------------------------------------------------------------------------------------------- mcl_okd

# 40 samples of 5 classes with uneven sizes (12, 8, 8, 6, 6), shuffled
_COUNTS = [12, 8, 8, 6, 6]
TRAIN = torch.cat([torch.full((n,), c) for c, n in enumerate(_COUNTS)])[torch.randperm(40, generator=torch.Generator().manual_seed(5))]


def okd(P=3, d=6, seed=0, key=KEY, **kw):
    cfg = MCLOKDTerm(name="mcl_okd", **{"K": 5, **kw})
    return build(cfg, ctx_for(P, C=5, embedding_dim=d, train_targets=TRAIN, seed=seed), key)


def test_okd_negatives_come_from_other_classes_uniformly():
    term = okd(K=7)
    y = torch.arange(5).repeat_interleave(600)  # 600 anchors of every class
    idx = term.sample_negatives(y)
    assert idx.shape == (3000, 7) and idx.dtype == torch.long
    assert ((idx >= 0) & (idx < 40)).all()
    assert (TRAIN[idx] != y[:, None]).all()  # never the anchor's own class
    for c in range(5):
        drawn = idx[y == c].flatten()
        assert set(TRAIN[drawn].tolist()) == set(range(5)) - {c}  # every other class appears
        # every sample outside class c is drawn, at a roughly uniform rate
        counts = torch.bincount(drawn, minlength=40).double()
        outside = TRAIN != c
        assert (counts[~outside] == 0).all()
        expected = drawn.numel() / int(outside.sum())
        assert counts[outside].min() > 0.6 * expected and counts[outside].max() < 1.4 * expected


def test_okd_sampler_state_travels_with_state_dict():
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    a = okd(seed=0)
    a.sample_negatives(y)  # advance the generator
    state = a.state_dict()
    assert "_extra_state" in state
    first = a.sample_negatives(y)
    second = a.sample_negatives(y)
    assert not torch.equal(first, second)
    b = okd(seed=123)  # a different seed: only the restored state can make it agree
    b.load_state_dict(state)
    torch.testing.assert_close(b.sample_negatives(y), first)
    torch.testing.assert_close(b.sample_negatives(y), second)
    torch.testing.assert_close(b.banks, a.banks)
    # same seed, fresh terms: the same draws
    torch.testing.assert_close(okd(seed=7).sample_negatives(y), okd(seed=7).sample_negatives(y))


def _okd_batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(40, generator=g)[:B]
    return {"index": index, "target": TRAIN[index]}


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("pair_reduction", ["sum", "mean"])
@pytest.mark.parametrize("tau, momentum, eps", [(0.1, 0.5, 1e-7), (0.5, 0.3, 0.05)])
def test_okd_loss_matches_reference_and_updates_banks(P, pair_reduction, tau, momentum, eps, monkeypatch):
    d, B = 6, 6
    term = okd(P=P, d=d, pair_reduction=pair_reduction, tau=tau, momentum=momentum, eps=eps)
    recorded = []
    sample = term.sample_negatives

    def record(y):
        idx = sample(y)
        recorded.append(idx.clone())
        return idx

    monkeypatch.setattr(term, "sample_negatives", record)
    batch = _okd_batch(B, seed=P)
    V = unit(P, B, d, seed=50 + P).requires_grad_(True)
    old = term.banks.clone()
    res = term(output(embeddings=V), batch)

    assert len(recorded) == 1
    rows_idx = torch.cat([batch["index"][:, None], recorded[0]], dim=1)  # positive first
    V64 = leaf64(V)
    banks64 = old.double()
    N = 40
    pairs = {(i, j): ref_nce_pair(banks64[i], V64[j], rows_idx, tau, N, eps) for i in range(P) for j in range(P) if i != j}
    total = sum(pairs.values())
    if pair_reduction == "mean":
        total = total / (P * (P - 1))
    close(res["loss"], total, rtol=2e-5)
    # per_peer attributes pair (i, j) to the peer j whose embedding is scored
    scale = 1.0 / (P * (P - 1)) if pair_reduction == "mean" else 1.0
    for j in range(P):
        close(res["per_peer"][j], scale * sum(v for (i, jj), v in pairs.items() if jj == j), rtol=2e-5)

    # (d) the embeddings get the reference gradient; the banks get none
    res["loss"].backward()
    total.backward()
    close(V.grad, V64.grad, rtol=1e-4, atol=1e-6)
    assert not term.banks.requires_grad and term.banks.grad is None

    # (c) the banks stay as they were through forward and backward (backward re-gathers the scored rows);
    # after_step applies the momentum update of the positives' rows, every other row unchanged
    assert torch.equal(term.banks, old)
    term.after_step()
    idx = batch["index"]
    for p in range(P):
        for n in range(N):
            if n in idx.tolist():
                b = idx.tolist().index(n)
                mixed = momentum * old[p, n].double() + (1 - momentum) * V[p, b].detach().double()
                close(term.banks[p, n], mixed / mixed.norm())
            else:
                assert torch.equal(term.banks[p, n], old[p, n])


def test_okd_banks_are_state_not_parameters():
    term = okd()
    assert term.banks.shape == (3, 40, 6)
    assert "banks" in dict(term.named_buffers()) and "banks" in term.state_dict()
    assert not any(p is term.banks for p in term.parameters())
    bound = 1.0 / math.sqrt(6 / 3)
    assert term.banks.abs().max() <= bound


@pytest.mark.parametrize("position", [0, 2])
def test_okd_too_many_negatives_is_a_user_error(position):
    # the largest class has 12 samples: at most 28 negatives fit
    okd(K=28)
    terms = [CETerm(name="ce")] * position + [MCLOKDTerm(name="mcl_okd", K=29)]
    ctx = ctx_for(2, C=5, embedding_dim=4, train_targets=TRAIN)
    with pytest.raises(UserError, match=rf"objective\.terms\.{position}\.K"):
        Objective(ObjectiveConfig(terms=terms), ctx)


# ------------------------------------------------------------------------------------------- Objective


def test_ramp_factor_values():
    L = 4.0
    for e in (0.0, 1.0, 3.0, 10.0):
        assert ramp_factor(Ramp(), e) == 1.0
        assert ramp_factor(Ramp(shape="constant", epochs=L), e) == 1.0
    linear = Ramp(shape="linear", epochs=L)
    for e, want in [(0.0, 0.0), (1.0, 0.25), (2.5, 0.625), (4.0, 1.0), (9.0, 1.0)]:
        assert ramp_factor(linear, e) == pytest.approx(want)
    sigmoid = Ramp(shape="sigmoid", epochs=L)
    for e, want in [(0.0, math.exp(-5.0)), (1.0, math.exp(-5 * 0.75**2)), (2.0, math.exp(-1.25)), (4.0, 1.0), (7.0, 1.0)]:
        assert ramp_factor(sigmoid, e) == pytest.approx(want)
    assert ramp_factor(Ramp(shape="linear", epochs=0.0), 0.0) == 1.0


def test_objective_weighted_ramped_sum_and_logs():
    P, B, C = 3, 5, 4
    terms = [
        CETerm(name="ce", weight=0.5, label_smoothing=0.1),
        DMLTerm(name="dml", weight=2.0, ramp=Ramp(shape="linear", epochs=10.0)),
        DOTTerm(name="dot", weight=0.7, T=2.0, ramp=Ramp(shape="sigmoid", epochs=4.0)),
        DMLTerm(name="dml", T=2.0, reduction="sum"),
    ]
    obj = Objective(ObjectiveConfig(terms=terms), ctx_for(P, C))
    assert obj.labels[0] == "ce" and obj.labels[2] == "dot"
    assert obj.labels[1] != obj.labels[3] and all(label.startswith("dml") for label in (obj.labels[1], obj.labels[3]))
    assert len(set(obj.labels)) == 4

    z = rnd(P, B, C, seed=60, scale=2.0).requires_grad_(True)
    y = torch.tensor([0, 3, 1, 1, 2])
    epoch = 3.0
    res = obj(output(logits=z), {"target": y}, epoch=epoch)

    z64 = z.detach().double()
    ce = ref_ce(z64, y, 0.1).sum()
    dml_a = ref_dml(z64, 1.0, 1 / (P - 1)).sum()
    ens = z64.mean(0)
    dot = ref_kd(z64[-1], ens, 2.0)
    dml_b = ref_dml(z64, 2.0, 1.0).sum()
    expected = 0.5 * ce + 2.0 * (epoch / 10.0) * dml_a + 0.7 * math.exp(-5 * (1 - epoch / 4.0) ** 2) * dot + dml_b
    close(res["loss"], expected)
    assert res["loss"].requires_grad

    logs = res["logs"]
    close(logs["loss"], expected)
    close(logs["loss/ce"], ce)
    close(logs[f"loss/{obj.labels[1]}"], dml_a)  # logged before the weight and ramp
    close(logs["loss/dot"], dot)
    close(logs[f"loss/{obj.labels[3]}"], dml_b)
    close(logs[f"{obj.labels[3]}/peer2"], ref_dml(z64, 2.0, 1.0)[2])
    assert all(not v.requires_grad for v in logs.values())
    res["loss"].backward()
    assert torch.isfinite(z.grad).all()


def test_objective_with_mcl_logs_parts():
    P, B, d = 2, 8, 5
    obj = Objective(ObjectiveConfig(terms=[MCLTerm(name="mcl", weight=0.5)]), ctx_for(P, embedding_dim=d))
    V = unit(P, B, d, seed=70).requires_grad_(True)
    res = obj(output(logits=rnd(P, B, 3), embeddings=V), {"target": LABELS8}, epoch=0.0)
    for part in ("vcl", "icl", "soft_vcl", "soft_icl", "peer0", "peer1"):
        assert f"mcl/{part}" in res["logs"] and not res["logs"][f"mcl/{part}"].requires_grad
    close(res["loss"], 0.5 * res["logs"]["loss/mcl"])


# ------------------------------------------------------------------------------------ config-time errors


@pytest.mark.parametrize("cfg", [MCLTerm(name="mcl"), MCLOKDTerm(name="mcl_okd", K=4)], ids=["mcl", "mcl_okd"])
@pytest.mark.parametrize("position", [0, 1])
def test_embedding_terms_need_embeddings(cfg, position):
    terms = [CETerm(name="ce")] * position + [cfg]
    with pytest.raises(UserError, match=rf"objective\.terms\.{position}\b.*embedding"):
        Objective(ObjectiveConfig(terms=terms), ctx_for(2, C=5, embedding_dim=None, train_targets=TRAIN))


@pytest.mark.parametrize(
    "cfg",
    [DMLTerm(name="dml"), DOTTerm(name="dot"), MCLTerm(name="mcl"), MCLOKDTerm(name="mcl_okd", K=4)],
    ids=["dml", "dot", "mcl", "mcl_okd"],
)
def test_peer_terms_need_two_peers(cfg):
    terms = [CETerm(name="ce"), cfg]
    with pytest.raises(UserError, match=r"objective\.terms\.1\b.*2 peers"):
        Objective(ObjectiveConfig(terms=terms), ctx_for(1, C=5, embedding_dim=4, train_targets=TRAIN))


def test_ce_alone_works_with_one_peer():
    obj = Objective(ObjectiveConfig(terms=[CETerm(name="ce")]), ctx_for(1, C=3))
    res = obj(output(logits=rnd(1, 4, 3)), {"target": torch.tensor([0, 1, 2, 0])}, epoch=0.0)
    assert torch.isfinite(res["loss"])


def test_okd_chunked_bank_scoring_equals_one_shot_scoring(monkeypatch):
    """The memory-lean scorer (bank by bank, batch chunk by chunk, rows re-gathered in backward) gives the
    values and the embedding gradient of one-shot functional scoring."""
    g = torch.Generator().manual_seed(3)
    banks = torch.nn.functional.normalize(torch.randn(3, 50, 8, generator=g), dim=-1)
    rows = torch.randint(0, 50, (10, 7), generator=g)
    weights = torch.randn(3, 3, 10, 7, generator=g)
    v = torch.nn.functional.normalize(torch.randn(3, 10, 8, generator=g), dim=-1)

    def loss_and_grad(score_fn):
        leaf = v.clone().requires_grad_(True)
        s = score_fn(leaf)
        return s, torch.autograd.grad((s.log() * weights).sum() + s.sum(), leaf)[0]

    ref, ref_grad = loss_and_grad(lambda x: mcl_okd.MF.bank_scores(banks[:, rows], x, 0.1))
    monkeypatch.setattr(mcl_okd, "ROWS_BUDGET", 7 * 8 * 3)  # 3 samples per chunk -> 4 chunks
    assert len(mcl_okd._chunks(rows, 8)) == 4
    got, got_grad = loss_and_grad(lambda x: mcl_okd._BankScores.apply(x, banks, rows, 0.1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-3 * ref_grad.abs().max().item() * 1e-3)


def test_mcl_runs_in_fp32_under_bf16_autocast():
    """Distillation math stays fp32 under autocast (METHODS §0.5): same value as without autocast."""
    term = TERMS.get("mcl").term(MCLTerm(name="mcl"), ctx_for(2, embedding_dim=6), "objective.terms.1")
    V = unit(2, 8, 6, seed=9)
    ref = term(output(embeddings=V), {"target": LABELS8})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = term(output(embeddings=V), {"target": LABELS8})
    for k in ("loss", "soft_vcl", "soft_icl", "vcl", "icl"):
        assert got[k].dtype == torch.float32, k
        torch.testing.assert_close(got[k], ref[k])
