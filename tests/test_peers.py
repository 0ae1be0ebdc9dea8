"""The peer group (METHODS §0.3, §0.5): topologies, per-peer views, shared-stem gradients, taps, heads, errors."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import mutualkd.models  # noqa: F401  (registers the zoo)
from mutualkd.config import load_config
from mutualkd.errors import UserError
from mutualkd.peers import PeerGroup

B, C = 4, 7
SMALL = dict(in_chans=1, image_size=(8, 8))  # the CIFAR zoo keeps the resolution in its stem
TIMM = dict(in_chans=3, image_size=(32, 32))


def make_group(archs, *overrides, in_chans=1, image_size=(8, 8), num_classes=C, seed=0):
    heads = any(o.startswith("embedding.head=") and o != "embedding.head=none" for o in overrides)
    terms = ["objective.terms=[{name: ce}, {name: mcl}]"] if heads else []  # heads need a term that uses them
    cfg = load_config(None, [f"peers.{i}.arch={a}" for i, a in enumerate(archs)] + list(overrides) + terms)
    torch.manual_seed(seed)
    return PeerGroup(cfg, num_classes, in_chans, image_size)


def batch(in_chans=1, image_size=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, in_chans, *image_size, generator=g), torch.randint(0, C, (B,), generator=g)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def shared_stem(archs, split, *overrides, **kw):
    return make_group(archs, "topology.kind=shared_stem", f"topology.split={split}", *overrides, **kw)


def shared_names(model, split):
    """Submodule names a shared-stem group aliases: the stem and the first `split` stages."""
    if hasattr(model, "stem"):
        return ["stem"] + [f"stages.{i}" for i in range(split)]
    return ["conv1", "bn1", "act1", "maxpool"] + [f"layer{i + 1}" for i in range(split)]


# ------------------------------------------------------------------------------------- independent
def test_independent_heterogeneous_peers_match_their_own_models():
    archs = ["cifar_resnet8", "wrn_16_1", "cifar_resnet8x4"]
    group = make_group(archs).eval()
    x, _ = batch()
    with torch.no_grad():
        out = group(x)
    assert group.archs == archs and group.names == ["peer0", "peer1", "peer2"]
    assert out.logits.shape == (3, B, C)
    assert out.embeddings is None and out.taps == [{}, {}, {}]
    for p, arch in enumerate(archs):
        model = group.peer_model(p)
        assert model is group.peers[p]
        with torch.no_grad():
            assert_close(out.logits[p], model(x))
            assert_close(out.pre_logits[p], model.forward_head(model.forward_features(x), pre_logits=True))
        assert out.pre_logits[p].shape == (B, model.num_features)
        assert group.param_counts()[p] == n_params(model) == n_params(timm.create_model(arch, num_classes=C, in_chans=1))
    assert [h.shape[1] for h in out.pre_logits] == [64, 64, 256]  # widths differ, so pre_logits stay a list
    assert n_params(group) == sum(group.param_counts())


def test_independent_train_mode_matches_model_forward():
    group = make_group(["cifar_resnet8", "wrn_16_1"]).train()
    refs = [copy.deepcopy(group.peer_model(p)).train() for p in range(2)]
    x, _ = batch()
    out = group(x)
    for p in range(2):
        assert_close(out.logits[p], refs[p](x))


def test_per_peer_views_feed_each_peer_its_own_input():
    group = make_group(["cifar_resnet8", "wrn_16_1", "cifar_resnet8"]).eval()
    views = [batch(seed=s)[0] for s in (1, 2, 3)]
    with torch.no_grad():
        out = group(views)
        for p, v in enumerate(views):
            assert_close(out.logits[p], group.peer_model(p)(v))
        # peers 0 and 2 are the same architecture: with the same view they agree only on their own weights
        assert not torch.allclose(out.logits[0], group.peer_model(0)(views[2]))


def test_per_peer_views_with_shared_stem_run_the_stem_per_view():
    group = shared_stem(["cifar_resnet8"] * 3, 1).eval()
    views = [batch(seed=s)[0] for s in (1, 2, 3)]
    with torch.no_grad():
        out = group(views, taps=["stem"])
        for p, v in enumerate(views):
            assert_close(out.logits[p], group.peer_model(p)(v))
            assert_close(out.taps[p]["stem"], group.peers[0].stem(v))


@pytest.mark.parametrize("arch", ["resnetv2_18", "nf_resnet26"])
def test_timm_family_with_more_after_its_stages(arch):
    """`stem` + `stages` by name, but forward_features goes on (norm, final_conv); resnetv2's classifier is a conv."""
    group = make_group(["cifar_resnet8", arch], **TIMM).eval()
    x, _ = batch(**TIMM)
    with torch.no_grad():
        out = group(x)
        assert_close(out.logits[1], group.peer_model(1)(x))
        assert_close(out.logits[0], group.peer_model(0)(x))
    assert out.pre_logits[1].shape == (B, group.peers[1].num_features)
    with pytest.raises(UserError, match=r"^topology\.kind"):
        make_group([arch, arch], "topology.kind=shared_stem", **TIMM)


# -------------------------------------------------------------------------------------- shared stem
@pytest.mark.parametrize("split", [0, 1])
def test_shared_stem_aliases_modules_and_deduplicates_parameters(split):
    P = 4
    group = shared_stem(["cifar_resnet8"] * P, split, "embedding.head=linear", "embedding.dim=16")
    names = shared_names(group.peers[0], split)
    for p in range(1, P):
        for name in names:
            assert group.peers[p].get_submodule(name) is group.peers[0].get_submodule(name)
        assert group.peers[p].stages[split] is not group.peers[0].stages[split]
        assert group.peers[p].fc is not group.peers[0].fc
    full = n_params(timm.create_model("cifar_resnet8", num_classes=C, in_chans=1))
    shared = sum(n_params(group.peers[0].get_submodule(n)) for n in names)
    heads = P * (64 * 16 + 16)
    assert n_params(group) == shared + P * (full - shared) + heads
    assert len({id(t) for t in group.parameters()}) == len(list(group.parameters()))
    assert group.param_counts() == [full] * P  # every deployable peer counts the stem


@pytest.mark.parametrize("split", [0, 1])
def test_shared_stem_branches_are_complete_networks(split):
    group = shared_stem(["cifar_resnet8"] * 4, split).eval()
    x, _ = batch()
    with torch.no_grad():
        out = group(x)
        for p in range(4):
            assert_close(out.logits[p], group.peer_model(p)(x))
        # a standalone copy of a branch (its own stem copy) still evaluates the same
        assert_close(out.logits[2], copy.deepcopy(group.peer_model(2))(x))
    assert len({tuple(z.flatten()[:3].tolist()) for z in out.logits}) == 4  # the branches differ


def stem_params(group, split):
    return [p for n in shared_names(group.peers[0], split) for p in group.peers[0].get_submodule(n).parameters()]


def check_stem_gradient_is_sum_of_branches(group, split, x, y):
    group.train()
    P = len(group.peers)
    shared = stem_params(group, split)
    out = group(x)
    losses = [F.cross_entropy(out.logits[p], y) for p in range(P)]
    per_branch = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    total = torch.autograd.grad(sum(losses), shared)
    for p in range(P):
        assert per_branch[p][0].abs().sum() > 0  # every branch reaches the stem's first conv
    for i, g in enumerate(total):
        assert_close(g, sum(pb[i] for pb in per_branch), rtol=1e-4, atol=1e-5)
    # the same sum when each branch runs as its own complete network (one stem, P backward passes)
    group.zero_grad()
    for p in range(P):
        F.cross_entropy(group.peer_model(p)(x), y).backward()
    for g, t in zip(total, shared):
        assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", [0, 1])
def test_shared_stem_gradient_is_sum_of_branch_gradients(split):
    group = shared_stem(["cifar_resnet8"] * 4, split)
    check_stem_gradient_is_sum_of_branches(group, split, *batch())


def test_stem_grad_scale_scales_only_the_shared_trunk():
    x, y = batch()
    grads = []
    for scale in (1.0, 0.25):
        group = shared_stem(["cifar_resnet8"] * 4, 1, f"topology.stem_grad_scale={scale}").train()
        out = group(x)
        sum(F.cross_entropy(z, y) for z in out.logits).backward()
        grads.append({n: t.grad.clone() for n, t in group.named_parameters()})
    plain, scaled = grads
    assert plain.keys() == scaled.keys()
    n_shared = 0
    for name in plain:
        if name.startswith(("peers.0.stem.", "peers.0.stages.0.")):
            n_shared += 1
            assert plain[name].abs().sum() > 0
            assert_close(scaled[name], 0.25 * plain[name])
        else:
            assert_close(scaled[name], plain[name])  # branches and classifiers are untouched
    assert n_shared > 0


def test_shared_stem_bn_statistics_update_once_per_forward():
    group = shared_stem(["cifar_resnet8"] * 4, 1).train()
    stem_bns = [m for m in group.peers[0].stem.modules() if isinstance(m, nn.BatchNorm2d)]
    branch_bns = [
        [m for m in group.peers[p].stages[2].modules() if isinstance(m, nn.BatchNorm2d)] for p in range(4)
    ]
    reference = copy.deepcopy(group.peers[0].stem)
    assert all(int(m.num_batches_tracked) == 0 for m in stem_bns)
    x, _ = batch()
    group(x)
    reference(x)
    assert all(int(m.num_batches_tracked) == 1 for m in stem_bns)  # not P
    assert all(int(m.num_batches_tracked) == 1 for bns in branch_bns for m in bns)
    ref_bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, r in zip(stem_bns, ref_bns):
        assert_close(m.running_mean, r.running_mean)
        assert_close(m.running_var, r.running_var)


def test_shared_stem_timm_resnet18():
    group = shared_stem(["resnet18", "resnet18"], 1, **TIMM)
    names = shared_names(group.peers[0], 1)
    assert names == ["conv1", "bn1", "act1", "maxpool", "layer1"]
    for name in names:
        assert group.peers[1].get_submodule(name) is group.peers[0].get_submodule(name)
    assert group.peers[1].layer2 is not group.peers[0].layer2
    full = n_params(timm.create_model("resnet18", num_classes=C))
    shared = sum(n_params(group.peers[0].get_submodule(n)) for n in names)
    assert n_params(group) == shared + 2 * (full - shared)
    x, y = batch(**TIMM)
    group.eval()
    with torch.no_grad():
        out = group(x, taps=group.available_taps())
        for p in range(2):
            assert_close(out.logits[p], group.peer_model(p)(x))
    assert out.taps[0]["stem"] is out.taps[1]["stem"] and out.taps[0]["stage1"] is out.taps[1]["stage1"]
    assert out.taps[0]["stage2"] is not out.taps[1]["stage2"]
    assert out.taps[0]["stem"].shape == (B, 64, 8, 8)  # after the max-pool
    info = group.peers[0].feature_info
    for s in range(1, 5):
        assert out.taps[0][f"stage{s}"].shape == (B, info[s]["num_chs"], 32 // info[s]["reduction"], 32 // info[s]["reduction"])
    check_stem_gradient_is_sum_of_branches(group, 1, x, y)


# ------------------------------------------------------------------------------------------- errors
def test_shared_stem_needs_one_architecture():
    with pytest.raises(UserError, match=r"^topology\.kind: .*cifar_resnet8.*wrn_16_1"):
        shared_stem(["cifar_resnet8", "wrn_16_1"], 1)


def test_shared_stem_split_must_leave_a_stage_per_branch():
    with pytest.raises(UserError, match=r"^topology\.split: 3 .*allowed 0\.\.2"):
        shared_stem(["cifar_resnet8"] * 2, 3)
    shared_stem(["cifar_resnet8"] * 2, 2)  # the last allowed split builds


def test_shared_stem_needs_a_stem_stages_layout():
    with pytest.raises(UserError, match=r"^topology\.kind: .*mobilenetv3_small_050"):
        shared_stem(["mobilenetv3_small_050"] * 2, 1, **TIMM)


@pytest.mark.parametrize("arch, hint", [("cifar_resnt8", "cifar_resnet8"), ("wrn_16_l", "wrn_16_1")])
def test_unknown_arch_names_the_key_with_a_suggestion(arch, hint):
    with pytest.raises(UserError, match=rf"^peers\.1\.arch: unknown model '{arch}'.*did you mean .*'{hint}'"):
        make_group(["cifar_resnet8", arch])


# --------------------------------------------------------------------------------------------- taps
def test_zoo_taps_match_recorded_shapes_and_feature_info():
    group = make_group(["cifar_resnet8", "wrn_16_1"]).eval()
    every = ["logits", "pre_logits", "stage1", "stage2", "stage3", "stem"]
    assert group.available_taps() == every
    x, _ = batch()
    with torch.no_grad():
        plain = group(x)
        out = group(x, taps=every)
    assert_close(out.logits, plain.logits)  # tapping changes nothing
    for p, model in enumerate(group.peers):
        taps = out.taps[p]
        assert sorted(taps) == every and sorted(group.tap_shapes[p]) == every
        for name, t in taps.items():
            assert t.shape == (B, *group.tap_shapes[p][name])
        for i, name in enumerate(["stem", "stage1", "stage2", "stage3"]):
            chs, red = model.feature_info[i]["num_chs"], model.feature_info[i]["reduction"]
            assert taps[name].shape == (B, chs, 8 // red, 8 // red)
        assert_close(taps["stem"], model.stem(x))
        assert taps["logits"] is not None and torch.equal(taps["logits"], out.logits[p])
        assert torch.equal(taps["pre_logits"], out.pre_logits[p])
    with torch.no_grad():
        some = group(x, taps=["stage2"])
    assert [sorted(t) for t in some.taps] == [["stage2"], ["stage2"]]


@pytest.mark.parametrize("split", [0, 1])
def test_shared_stem_taps_are_shared_tensors(split):
    group = shared_stem(["cifar_resnet8"] * 3, split).eval()
    x, _ = batch()
    with torch.no_grad():
        out = group(x, taps=["stem", "stage1", "stage2"])
    for p in range(1, 3):
        assert out.taps[p]["stem"] is out.taps[0]["stem"]
        assert (out.taps[p]["stage1"] is out.taps[0]["stage1"]) == (split == 1)
        assert out.taps[p]["stage2"] is not out.taps[0]["stage2"]
    assert group.tap_shapes[0] == group.tap_shapes[2]


def test_timm_taps_without_stage_layout_use_forward_intermediates():
    group = make_group(["cifar_resnet8", "mobilenetv3_small_050"], **TIMM).eval()
    mnet = group.peers[1]
    features = [f"feature{i}" for i in range(len(mnet.feature_info))]
    assert len(features) == 5
    assert group.available_taps() == sorted(["logits", "pre_logits", "stem", "stage1", "stage2", "stage3"] + features)
    x, _ = batch(**TIMM)
    with torch.no_grad():
        plain = group(x)
        out = group(x, taps=group.available_taps())
        assert_close(plain.logits[1], mnet(x))
    assert_close(out.logits, plain.logits)
    assert sorted(out.taps[1]) == sorted(["logits", "pre_logits"] + features)
    assert sorted(out.taps[0]) == ["logits", "pre_logits", "stage1", "stage2", "stage3", "stem"]
    assert sorted(group.tap_shapes[1]) == sorted(out.taps[1])
    for i, name in enumerate(features):
        t = out.taps[1][name]
        assert t.shape == (B, *group.tap_shapes[1][name])
        assert t.shape[1] == mnet.feature_info[i]["num_chs"]
        assert t.shape[2] == -(-32 // mnet.feature_info[i]["reduction"])
    with torch.no_grad():
        few = group(x, taps=["feature3", "feature1"])
        none = group(x, taps=["feature9"])  # no peer has it: nothing tapped, nothing fails
    assert sorted(few.taps[1]) == ["feature1", "feature3"] and few.taps[0] == {}
    assert_close(few.taps[1]["feature3"], out.taps[1]["feature3"])
    assert none.taps == [{}, {}]
    assert_close(none.logits, plain.logits)


# -------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_projection_heads_give_unit_embeddings(head):
    archs = ["cifar_resnet8", "cifar_resnet8x4"]
    group = make_group(archs, f"embedding.head={head}", "embedding.dim=16", "embedding.hidden=32")
    x, _ = batch()
    out = group(x)
    assert out.embeddings.shape == (2, B, 16) and out.embeddings.dtype == torch.float32
    assert_close(out.embeddings.norm(dim=-1), torch.ones(2, B))
    for p, h in enumerate(group.heads):
        assert_close(out.embeddings[p], F.normalize(h(out.pre_logits[p]), dim=1))
        first = h if head == "linear" else h[0]
        assert first.in_features == group.peers[p].num_features  # sized by the dry run
        if head == "mlp":
            assert h[0].out_features == 32 and h[2].out_features == 16
    out.embeddings.sum().backward()
    assert all(t.grad is not None for t in group.heads.parameters())
    for p, arch in enumerate(archs):
        model = group.peer_model(p)
        assert not any("head" in k for k in model.state_dict())
        assert n_params(model) == group.param_counts()[p] == n_params(timm.create_model(arch, num_classes=C, in_chans=1))
    assert n_params(group) == sum(group.param_counts()) + n_params(group.heads)


def test_mlp_hidden_defaults_to_the_pre_logits_width():
    group = make_group(["cifar_resnet8x4", "cifar_resnet8x4"], "embedding.head=mlp")
    assert group.heads[0][0].out_features == 256 and group.heads[0][2].out_features == 128


def test_no_heads():
    group = make_group(["cifar_resnet8", "cifar_resnet8"])
    assert group.heads is None
    assert group(batch()[0]).embeddings is None


# ------------------------------------------------------------------------------------------ dry run
@pytest.mark.parametrize("topology", ["independent", "shared_stem"])
def test_build_leaves_bn_statistics_weights_and_rng_untouched(topology):
    """Peer p's weights come from its own stream seeded by (seed, p); the global stream is left as it was."""
    archs = ["cifar_resnet8", "cifar_resnet8"]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    group = make_group(archs, f"topology.kind={topology}", seed=123)
    assert torch.equal(before, torch.random.get_rng_state())  # the build draws nothing from the global stream
    assert group.training and all(m.training for m in group.modules())
    fresh = []
    for p, a in enumerate(archs):
        torch.manual_seed(0 * 100_003 + p)  # config seed 0, peer index p
        fresh.append(timm.create_model(a, num_classes=C, in_chans=1))
    for p in range(2):
        for name, ref in fresh[p].state_dict().items():
            if topology == "independent" or p == 0 or not name.startswith(("stem.", "stages.0.")):  # split 1
                assert torch.equal(group.peers[p].state_dict()[name], ref), name
    for m in group.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert int(m.num_batches_tracked) == 0
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
