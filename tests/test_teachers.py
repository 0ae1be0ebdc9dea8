"""Offline teachers: loading (run dir, safetensors export, timm name), input re-normalisation, the multi-teacher
policy, KD and FitNets terms, multi-stage training, and the config-time errors around them."""

import pytest
import torch
import torch.nn.functional as F
from teaching import assert_teachers_untouched, train_steps

from mutualkd import config as C
from mutualkd.cli import main
from mutualkd.data import load_splits as _load_splits
from mutualkd.errors import UserError
from mutualkd.export import export_peer
from mutualkd.losses import functional as MF
from mutualkd.teachers import InputSpec, TeacherSet


def load_splits(name, **data):
    return _load_splits(C.validate({"data": {"name": name, **data}}).data)


def digits_spec():
    return load_splits("digits").spec


def teacher_set(*teachers, **extra):
    cfg = C.load_config(None, [f"teachers={list(teachers)}", *[f"{k}={v}" for k, v in extra.items()]])
    return TeacherSet(cfg, digits_spec())


def probe(n=6):
    splits = load_splits("digits")
    from mutualkd.data import BatchAugment

    return BatchAugment(splits.spec)(splits.test.images[:n], None, train=False)


# ----------------------------------------------------------------------------------------------- loading
def test_a_teacher_loads_the_same_from_its_run_directory_and_from_its_export(digits_teacher, tmp_path):
    weights = export_peer(digits_teacher, "0", out_dir=tmp_path)
    ts = teacher_set({"run": digits_teacher}, {"file": str(weights), "name": "exported"},
                     {"run": digits_teacher, "peer": "peer0", "checkpoint": "last", "name": "by_name"})
    x = probe()
    a, b, c = (t(x)[0] for t in ts.teachers)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.argmax(1).eq(load_splits("digits").test.targets[:6]).float().mean() >= 0.5  # a trained teacher
    assert ts.teachers[0].tap_shapes["stage3"] == (64, 2, 2)


def test_a_timm_name_gives_a_teacher_and_unknown_sources_fail_with_the_key(digits_teacher, tmp_path):
    ts = teacher_set({"arch": "cifar_resnet8"})
    logits, taps = ts.teachers[0](probe(), taps={"stage2"})
    assert logits.shape == (6, 10) and taps["stage2"].shape == (6, 32, 4, 4)
    with pytest.raises(UserError, match=r"teachers\.0\.arch: unknown model 'nosuchnet'"):
        teacher_set({"arch": "nosuchnet"})
    with pytest.raises(UserError, match=r"teachers\.0\.file: not found"):
        teacher_set({"file": str(tmp_path / "none.safetensors")})
    with pytest.raises(UserError, match="run directory not found"):
        teacher_set({"run": str(tmp_path / "nothing")})
    with pytest.raises(UserError, match=r"teachers\.0\.peer: 3 is not a peer of that run; peers: 0 \(peer0\)"):
        teacher_set({"run": digits_teacher, "peer": 3})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        teacher_set({"file": str(bad), "arch": "cifar_resnet8"})


def test_students_inputs_are_renormalised_channel_matched_and_resized_for_the_teacher():
    spec = digits_spec()  # 1 channel, 8x8
    ts = teacher_set({"arch": "cifar_resnet8", "model_kwargs": {"in_chans": 3}, "mean": [0.1, 0.2, 0.3],
                      "std": [0.5, 0.6, 0.7], "image_size": 16})
    t = ts.teachers[0]
    x = probe()
    raw = x * torch.tensor(spec.std).view(1, -1, 1, 1) + torch.tensor(spec.mean).view(1, -1, 1, 1)
    want = F.interpolate(raw.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", align_corners=False,
                         antialias=True)
    want = (want - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(t.adapt(x), want)
    assert t.tap_shapes["stage1"] == (16, 16, 16)
    same = teacher_set({"arch": "cifar_resnet8"}).teachers[0]
    assert same.adapt(x) is x  # identical normalisation: no transform at all
    assert InputSpec(1, (8, 8), (0.5,), (0.5,)) == InputSpec(1, (8, 8), (0.5,), (0.5,))


# ------------------------------------------------------------------------------------------------ policy
def test_policies_assign_teachers_to_peers(digits_teacher):
    two = [{"run": digits_teacher, "name": "a"}, {"arch": "cifar_resnet8", "name": "b"}]
    assert teacher_set(*two).assignment(5) == [[0, 1], [0, 1]]
    rr = teacher_set(*two, **{"teacher_policy.mode": "round_robin"})
    assert [rr.assignment(s) for s in range(3)] == [[[0], [0]], [[1], [1]], [[0], [0]]]
    asg = teacher_set(*two, teacher_policy="{mode: assigned, assign: {peer0: b, peer1: a}}")
    assert asg.assignment(0) == [[1], [0]]


def test_round_robin_runs_one_teacher_per_step_and_kd_follows_it(digits_teacher):
    s = train_steps([f"teachers=[{{run: {digits_teacher}, name: a}}, {{arch: cifar_resnet8, name: b}}]",
                     "teacher_policy.mode=round_robin", "objective.terms=[{name: ce}, {name: kd}]"], steps=0)
    obj, x = s.trainer.objective, probe()
    assert sorted(obj.teach(x, 0, 0.0).logits) == [0] and sorted(obj.teach(x, 1, 0.0).logits) == [1]
    out = s.trainer.group(x)
    teach = obj.teach(x, 1, 0.0)
    got = obj(out, {"target": torch.zeros(6, dtype=torch.long)}, 0.0, teach)["logs"]
    want = [MF.kd_kl(out.logits[p], teach.logits[1]) for p in range(2)]
    torch.testing.assert_close(torch.stack([got["kd/peer0"], got["kd/peer1"]]), torch.stack(want))


def test_kd_averages_logits_or_losses_and_assigned_peers_learn_from_their_own_teacher(digits_teacher):
    two = f"teachers=[{{run: {digits_teacher}, name: a}}, {{arch: cifar_resnet8, name: b}}]"
    x, y = probe(), {"target": torch.zeros(6, dtype=torch.long)}
    for average in ("logits", "loss"):
        s = train_steps([two, f"objective.terms=[{{name: kd, average: {average}, T: 2.0}}]"], steps=0)
        obj = s.trainer.objective
        out, teach = s.trainer.group(x), obj.teach(x, 0, 0.0)
        got = obj(out, y, 0.0, teach)["logs"]["kd/peer1"]
        ta, tb = teach.logits[0], teach.logits[1]
        want = MF.kd_kl(out.logits[1], (ta + tb) / 2, 2.0) if average == "logits" else \
            (MF.kd_kl(out.logits[1], ta, 2.0) + MF.kd_kl(out.logits[1], tb, 2.0)) / 2
        torch.testing.assert_close(got, want)
    s = train_steps([two, "teacher_policy={mode: assigned, assign: {peer0: b, peer1: a}}",
                     "objective.terms=[{name: kd, direction: reverse}]"], steps=0)
    obj = s.trainer.objective
    out, teach = s.trainer.group(x), obj.teach(x, 0, 0.0)
    got = obj(out, y, 0.0, teach)["logs"]
    torch.testing.assert_close(got["kd/peer0"], MF.kd_kl(out.logits[0], teach.logits[1], direction="reverse"))
    torch.testing.assert_close(got["kd/peer1"], MF.kd_kl(out.logits[1], teach.logits[0], direction="reverse"))


# ----------------------------------------------------------------------------------------------- methods
def test_kd_with_dml_trains_students_and_leaves_the_teacher_untouched(digits_teacher):
    run = [f"teachers=[{{run: {digits_teacher}}}]", "objective.terms=[{name: ce, weight: 0.1}, {name: kd}, {name: dml}]"]
    s = train_steps(run, steps=6)
    assert_teachers_untouched(s)
    assert all(torch.isfinite(torch.tensor(list(log.values()))).all() for log in s.logs)
    assert {"kd/peer0", "kd/peer1", "dml/peer0", "loss/ce"} <= set(s.logs[0])

    def kd_on_probe(trainer):  # KD toward the teacher on the same held-out images, students in eval mode
        x = probe(64)
        trainer.group.eval()
        with torch.no_grad():
            teacher = trainer.teachers(x, 0, {0: set()}).logits[0]
            return [float(MF.kd_kl(z, teacher)) for z in trainer.group(x).logits]

    before, after = kd_on_probe(train_steps(run, steps=0).trainer), kd_on_probe(s.trainer)
    assert all(a < b for a, b in zip(after, before)), (before, after)  # the students move toward the teacher


def test_kd_per_peer_equals_kd_kl_per_peer_in_both_directions():
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    for d in ("forward", "reverse"):
        want = torch.stack([MF.kd_kl(z[p], t[p], 3.0, d) for p in range(3)])
        torch.testing.assert_close(MF.kd_per_peer(z, t, 3.0, d), want)
        torch.testing.assert_close(MF.kd_per_peer(z, t[0], 3.0, d), torch.stack([MF.kd_kl(z[p], t[0], 3.0, d)
                                                                                  for p in range(3)]))
    # reverse KL by hand: T² · mean_b Σ_c p_s (log p_s − log p_t)
    p_s, p_t = F.softmax(z[0] / 3.0, 1), F.softmax(t[0] / 3.0, 1)
    torch.testing.assert_close(MF.kd_kl(z[0], t[0], 3.0, "reverse"),
                               9.0 * (p_s * (p_s.log() - p_t.log())).sum(1).mean())
    with pytest.raises(ValueError, match="kd_kl: unknown direction 'sideways'"):
        MF.kd_kl(z[0], t[0], direction="sideways")


def test_kd_refuses_a_teacher_with_other_classes(digits_teacher):
    with pytest.raises(UserError, match=r"objective\.terms\.0 \(kd\): teacher0 has 7 classes, the peers 10: KD needs "
                                        r"the same classes C on both sides \(METHODS\.md §2\.11\)"):
        train_steps(["teachers=[{arch: cifar_resnet8, num_classes: 7}]", "objective.terms=[{name: kd}]"], steps=0)


def test_fitnet_trains_its_regressors_and_matches_its_formula(digits_teacher):
    s = train_steps([f"teachers=[{{run: {digits_teacher}}}]", "objective.terms=[{name: ce}, {name: fitnet}]"],
                    steps=3)
    assert_teachers_untouched(s)
    term = s.trainer.objective.terms[1]
    assert term.tap == "stage2" and term.t_taps == {0: "stage2"}  # the middle of 3 stages
    reg = term.regressors["0_0"]
    assert isinstance(reg[0], torch.nn.Conv2d) and reg[0].kernel_size == (3, 3) and reg[0].stride == (1, 1)
    assert any(p is reg[0].weight for p in s.trainer.objective.main_parameters())
    x, obj = probe(), s.trainer.objective
    out, teach = s.trainer.group(x, taps=obj.student_taps), obj.teach(x, 0, 0.0)
    want = ((reg(out.taps[0]["stage2"]) - teach.taps[0]["stage2"]) ** 2).mean()
    torch.testing.assert_close(obj(out, {"target": torch.zeros(6, dtype=torch.long)}, 0.0, teach)["logs"]
                               ["fitnet/peer0"], want)


def test_fitnet_regressors_stride_or_upsample_by_integer_factors_and_name_both_shapes_otherwise(digits_teacher):
    s = train_steps([f"teachers=[{{run: {digits_teacher}}}]",
                     "objective.terms=[{name: fitnet, tap: stage1, teacher_tap: stage2}]"], steps=0)
    conv = s.trainer.objective.terms[0].regressors["0_0"][0]  # 16x8x8 -> 32x4x4
    assert isinstance(conv, torch.nn.Conv2d) and conv.stride == (2, 2) and conv.out_channels == 32
    s = train_steps([f"teachers=[{{run: {digits_teacher}}}]",
                     "objective.terms=[{name: fitnet, tap: stage3, teacher_tap: stage1}]"], steps=1)
    assert isinstance(s.trainer.objective.terms[0].regressors["0_0"][0], torch.nn.ConvTranspose2d)  # 2x2 -> 8x8
    with pytest.raises(UserError, match=r"objective\.terms\.0 \(fitnet\): cannot match peer0 pre_logits \[64\] with "
                                        r"teacher0 stage2 \[32, 4, 4\]: FitNets needs C and H×W .* \(METHODS\.md §2\.11\)"):
        train_steps([f"teachers=[{{run: {digits_teacher}}}]",
                     "objective.terms=[{name: fitnet, tap: pre_logits, teacher_tap: stage2}]"], steps=0)
    with pytest.raises(UserError, match=r"objective\.terms\.0\.tap: peer0 has no tap 'stage9'; its taps: logits, "
                                        r"pre_logits, stage1, stage2, stage3, stem"):
        train_steps([f"teachers=[{{run: {digits_teacher}}}]", "objective.terms=[{name: fitnet, tap: stage9}]"],
                    steps=0)


def test_fitnet_paper_form_is_half_the_squared_norm_per_sample(digits_teacher):
    s = train_steps([f"teachers=[{{run: {digits_teacher}}}]", "objective.terms=[{name: fitnet, paper_form: true}]"],
                    steps=0)
    obj, x = s.trainer.objective, probe()
    out, teach = s.trainer.group(x, taps=obj.student_taps), obj.teach(x, 0, 0.0)
    reg = obj.terms[0].regressors["1_0"]
    diff = reg(out.taps[1]["stage2"]) - teach.taps[0]["stage2"]
    torch.testing.assert_close(obj(out, {}, 0.0, teach)["logs"]["fitnet/peer1"], 0.5 * diff.pow(2).sum() / 6)


# ------------------------------------------------------------------------------------------------ stages
def test_two_stage_fitnets_trains_only_the_front_and_the_regressor_first(digits_teacher, tmp_path):
    """Stage 1 (hint only) leaves the peers' later stages and classifier untouched; stage 2 trains them."""
    run = tmp_path / "run"
    args = ["train", f"teachers=[{{run: {digits_teacher}}}]", "train.epochs=2", "train.progress=false",
            "objective.terms=[{name: fitnet}, {name: ce, weight: 0.1}, {name: kd}]",
            "objective.stages=[{epochs: 1, terms: [fitnet]}, {epochs: 1, terms: [ce, kd]}]"]
    init = train_steps(["objective.terms=[{name: ce}]"], steps=0).trainer.group.state_dict()  # seed 0's initial peers
    assert main([*args, "train.max_steps=5", "--run-dir", str(run)]) == 0
    from mutualkd.engine import checkpoint

    mid = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    assert not torch.equal(mid["peers.0.stages.0.0.conv1.conv.weight"], init["peers.0.stages.0.0.conv1.conv.weight"])
    assert torch.equal(mid["peers.0.stages.2.0.conv1.conv.weight"], init["peers.0.stages.2.0.conv1.conv.weight"])
    assert torch.equal(mid["peers.0.fc.weight"], init["peers.0.fc.weight"])
    assert main(["train", "--resume", str(run)]) == 0
    end = checkpoint.load(run / "checkpoints" / "last.pt")
    assert not torch.equal(end["model"]["peers.0.fc.weight"], init["peers.0.fc.weight"])
    import json

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = [r["train"] for r in lines if "train" in r and r["epoch"] <= 1]
    later = [r["train"] for r in lines if "train" in r and r["epoch"] > 1.05]
    assert all("loss/fitnet" in t and "loss/kd" not in t for t in first)
    assert all("loss/kd" in t and "loss/fitnet" not in t for t in later)


# ------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, message", [
    (["objective.terms=[{name: kd}]"],
     r"objective\.terms\.0 \(kd\): a teacher term needs teachers; add a `teachers:` list"),
    (["teachers=[{arch: cifar_resnet8}]", "objective.terms=[{name: kd, teacher: nobody}]"],
     r"objective\.terms\.0\.teacher: unknown teacher 'nobody'; teachers: 'teacher0'"),
    (["teachers=[{arch: cifar_resnet8, name: t}, {arch: cifar_resnet8, name: t}]"], r"teachers\.1\.name: duplicate teacher name"),
    (["teachers=[{arch: cifar_resnet8, run: x}]"], r"teachers\.0: name the teacher's source with exactly one of"),
    (["teachers=[{arch: cifar_resnet8}]", "teacher_policy={mode: assigned, assign: {peer0: teacher0}}"],
     r"teacher_policy\.assign: peer 'peer1' has no teacher"),
    (["teachers=[{arch: cifar_resnet8}]", "teacher_policy.assign={peer7: teacher0}"],
     r"teacher_policy\.assign: unknown peer 'peer7'"),
    (["teachers=[{arch: cifar_resnet8}]", "data.views=per_peer"], r"data\.views: per_peer views are not supported"),
    (["teachers=[{arch: cifar_resnet8}]", "objective.terms=[{name: fitnet}]", "placement=peer_parallel"],
     r"objective\.terms\.0 \(fitnet\): feature terms need every peer's taps in one process"),
    (["objective.stages=[{epochs: 5, terms: [ce]}]"],
     r"objective\.stages: the stages' epochs add up to 5, train\.epochs is 12"),
    (["objective.stages=[{epochs: 12, terms: [kd]}]"], r"objective\.stages\.0\.terms: unknown term 'kd'; terms: ce, dml"),
])
def test_teacher_config_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        C.load_config(None, overrides)


def test_a_bad_teacher_stops_the_cli_with_exit_2_before_the_run_directory_exists(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", f"teachers=[{{run: {tmp_path / 'missing'}}}]", "objective.terms=[{name: kd}]",
                 "--run-dir", str(run)])
    assert code == 2 and not run.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run directory not found" in err[0]


def test_resume_with_a_teacher_and_adapters_equals_an_uninterrupted_run(digits_teacher, tmp_path):
    """Regressors (objective state) are checkpointed and restored; the teacher is reloaded from its run."""
    from mutualkd.engine import checkpoint

    args = [f"teachers=[{{run: {digits_teacher}}}]", "objective.terms=[{name: ce}, {name: kd}, {name: fitnet}]",
            "train.epochs=2", "train.progress=false"]
    assert main(["train", *args, "--run-dir", str(tmp_path / "whole")]) == 0
    assert main(["train", *args, "train.max_steps=13", "--run-dir", str(tmp_path / "split")]) == 0
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 40
    for part in ("model", "objective"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert "terms.2.regressors.0_0.0.weight" in a["objective"]
