"""Adversarial teacher terms (METHODS.md §1.10, §2.9, §2.10), the reconstruction auxiliary and composed_digits:
real training steps on digits, discriminators outside the peers' optimizer and frozen for the peers' loss,
MKTN routing, LW-KD's label-drawn targets, exact resume of discriminators and export without them."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from teaching import assert_teachers_untouched, train_steps

from mutualkd import config as C
from mutualkd.cli import main
from mutualkd.data import load_splits as _load_splits
from mutualkd.engine import checkpoint
from mutualkd.errors import UserError
from mutualkd.losses.discriminator import Discriminator, DiscriminatorConfig, discriminator_optimizer

QUIET = "train.progress=false"
COMPLEMENTARY = "objective.terms=[{name: ce}, {name: complementary}]"
LWKD = "objective.terms=[{name: ce, weight: 0.1}, {name: lwkd}]"


def teachers(**runs) -> str:
    return "teachers=[" + ", ".join(f"{{name: {n}, run: {r}}}" for n, r in runs.items()) + "]"


def train(run_dir, *overrides) -> Path:
    assert main(["train", QUIET, *overrides, "--run-dir", str(run_dir)]) == 0
    return Path(run_dir)


def load_splits(name, **data):
    return _load_splits(C.validate({"data": {"name": name, **data}}).data)


@pytest.fixture(scope="module")
def generative_teacher(tmp_path_factory):
    """A one-peer cifar_resnet8 trained 1 epoch on digits with CE + reconstruction (MKTN's generative teacher)."""
    return str(train(tmp_path_factory.mktemp("gen") / "run", "peers=[{arch: cifar_resnet8}]", "train.epochs=1",
                     "objective.terms=[{name: ce}, {name: reconstruction}]"))


@pytest.fixture(scope="module")
def lightweight_teacher(tmp_path_factory):
    """LW-KD's lightweight teacher: a one-peer cifar_resnet8 trained 4 epochs on composed_digits (10 classes)."""
    return str(train(tmp_path_factory.mktemp("lw") / "run", "data.name=composed_digits", "train.epochs=4",
                     "peers=[{arch: cifar_resnet8}]", "objective.terms=[{name: ce}]"))


def one_batch(b, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = b.splits.train.__getitems__(list(range(n)))
    x = b.augment(data["image"], g, train=True)
    return x, {"target": data["target"], "index": data["index"], "input": x}


def d_state(term) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in [*term.discriminators.named_parameters(),
                                              *term.discriminators.named_buffers()]}


def phase_of(objective, term):
    """(label, UpdatePhase) of the term's discriminator phase, as the trainer runs it."""
    (label, phase), = [(label, phase) for label, phase in objective.phases
                       if objective.terms[objective.labels.index(label)] is term]
    return label, phase


def adam_steps(objective, term) -> set[int]:
    return {int(s["step"]) for s in phase_of(objective, term)[1].optimizer.state.values()}


def outside_peer_optimizer(objective, term) -> None:
    own = {id(p) for p in phase_of(objective, term)[1].parameters}
    assert own == {id(p) for p in term.discriminators.parameters()} and own
    assert not own & {id(p) for p in objective.main_parameters()}


# ----------------------------------------------------------------------------------- discriminator piece
def test_map_discriminator_follows_the_design_and_keeps_tiny_maps_spatial():
    cfg = DiscriminatorConfig()
    for shape, strides in [((16, 8, 8), [2, 2]), ((32, 4, 4), [2, 1]), ((64, 2, 2), [1, 1])]:
        d = Discriminator.for_maps(shape)
        convs = [m for m in d.net if isinstance(m, torch.nn.Conv2d)]
        assert [c.stride[0] for c in convs] == strides and all(c.kernel_size == (3, 3) for c in convs)
        assert d.net(torch.randn(4, *shape)).shape == (4, 1)
        opt = discriminator_optimizer(d.parameters(), cfg)
        assert opt.defaults["betas"] == (0.5, 0.999) and opt.defaults["lr"] == 2e-4
    mlp = Discriminator.for_probabilities(10, 32)
    assert mlp.net(torch.softmax(torch.randn(4, 10), 1)).shape == (4, 1) and mlp.net[0].out_features == 32


# ------------------------------------------------------------------------------------------ complementary
def test_complementary_trains_with_discriminators_outside_the_peer_optimizer(digits_teacher):
    s = train_steps([teachers(t=digits_teacher), COMPLEMENTARY], steps=3)
    assert_teachers_untouched(s)
    obj, term = s.trainer.objective, s.trainer.objective.terms[1]
    outside_peer_optimizer(obj, term)
    assert {id(p) for p in term.align.parameters()} <= {id(p) for p in obj.main_parameters()}
    assert sorted(term.discriminators) == ["0_0", "1_0"] and adam_steps(obj, term) == {3}
    assert all(p.grad is None for p in term.discriminators.parameters())  # the main backwards never reached D
    fresh = d_state(train_steps([teachers(t=digits_teacher), COMPLEMENTARY], steps=0).trainer.objective.terms[1])
    assert all(not torch.equal(v, fresh[k]) for k, v in d_state(term).items() if k.endswith("weight"))
    for log in s.logs:
        parts = log["complementary/feature"] * 100 + log["complementary/adversarial"] * 0.1
        assert log["loss/complementary"] == pytest.approx(parts, rel=1e-5)
        assert 0 < log["complementary/discriminator"] < 2


def test_discriminator_steps_in_its_own_phase_then_is_frozen_for_the_peers_loss(digits_teacher):
    b = train_steps([teachers(t=digits_teacher), COMPLEMENTARY], steps=0).trainer
    obj, term = b.objective, b.objective.terms[1]
    x, batch = one_batch(b)
    before = d_state(term)
    out, teach = b.group(x, taps=obj.student_taps), obj.teach(x, 0, 0.0)
    b.run_phase(*phase_of(obj, term), out, batch, teach)  # what train_step runs between forward and losses
    stepped = d_state(term)
    assert all(not torch.equal(before[k], v) for k, v in stepped.items() if k.endswith("weight"))  # D step ran
    assert adam_steps(obj, term) == {1} and all(p.grad is None for p in term.discriminators.parameters())
    assert all(p.grad is None for p in [*b.group.parameters(), *obj.main_parameters()])  # D's step touched only D
    losses = obj(out, batch, 0.0, teach)
    losses["loss"].backward()
    assert all(p.grad is None for p in term.discriminators.parameters())  # no gradient from the peers' loss
    assert all(p.grad is not None for p in term.align.parameters())
    peers_opt = torch.optim.SGD(list(b.group.parameters()) + obj.main_parameters(), lr=0.1)
    peers_opt.step()
    assert all(torch.equal(v, d_state(term)[k]) for k, v in stepped.items())  # neither backward nor step moved D


def test_mktn_routes_the_feature_loss_and_the_adversarial_loss_to_their_teachers(digits_teacher, generative_teacher):
    route = "objective.terms=[{name: ce}, {name: complementary, routing: mktn, feature_teacher: disc, " \
            "adversarial_teacher: gen}]"
    s = train_steps([teachers(disc=digits_teacher, gen=generative_teacher), route], steps=2)
    assert_teachers_untouched(s)
    b = s.trainer
    obj, term = b.objective, b.objective.terms[1]
    outside_peer_optimizer(obj, term)
    assert term.teacher_wants([[0, 1], [0, 1]]) == {0: {"stage3"}, 1: {"stage3"}}
    assert sorted(term.align) == ["0_0", "0_1", "1_0", "1_1"] and sorted(term.discriminators) == ["0_1", "1_1"]
    x, batch = one_batch(b)
    out = b.group(x, taps=obj.student_taps)
    teach = obj.teach(x, 2, 0.0)
    reals = []
    for d in term.discriminators.values():
        loss = d.loss
        d.loss = lambda real, fake, loss=loss: reals.append(real) or loss(real, fake)
    term.discriminator_loss(out, batch, teach)  # the discriminators' update phase
    parts = term(out, batch, teach)
    assert len(reals) == 2 and all(r is teach.taps[1]["stage3"] for r in reals)  # D: real = generative teacher
    feature = sum(((term.align[f"{p}_0"](out.taps[p]["stage3"]) - teach.taps[0]["stage3"]) ** 2).mean()
                  for p in range(2))  # the feature loss: the discriminative teacher through its own A
    torch.testing.assert_close(parts["feature"], feature)
    teach.taps[1]["stage3"] = teach.taps[1]["stage3"] + 100.0
    torch.testing.assert_close(term(out, batch, teach)["feature"], feature)


@pytest.mark.parametrize("term, match", [
    ("{name: complementary, routing: mktn, feature_teacher: t}",
     r"objective\.terms\.1\.adversarial_teacher: routing mktn"),
    ("{name: complementary, feature_teacher: t}", r"objective\.terms\.1\.feature_teacher: only used with routing mktn"),
    ("{name: complementary, tap: pre_logits}", r"objective\.terms\.1 \(complementary\): cannot match peer0 pre_logits"),
])
def test_complementary_user_errors_name_the_key(digits_teacher, term, match):
    with pytest.raises(UserError, match=match):
        train_steps([teachers(t=digits_teacher), f"objective.terms=[{{name: ce}}, {term}]"], steps=0)


# ----------------------------------------------------------------------------------------- reconstruction
def test_reconstruction_decodes_the_tap_to_the_input_and_matches_a_hand_computation():
    s = train_steps(["objective.terms=[{name: ce}, {name: reconstruction}]"], steps=2)
    b = s.trainer
    term = b.objective.terms[1]
    assert term.taps == ["stage3", "stage3"] and b.objective.student_taps == ["stage3"]
    assert {id(p) for p in term.decoders.parameters()} <= {id(p) for p in b.objective.main_parameters()}
    x, batch = one_batch(b)
    out = b.group(x, taps=b.objective.student_taps)
    recon = [dec(out.taps[p]["stage3"]) for p, dec in enumerate(term.decoders)]  # 64x2x2 -> 1x8x8
    assert all(r.shape == x.shape for r in recon)
    torch.testing.assert_close(term(out, batch)["loss"], sum(((r - x) ** 2).mean() for r in recon))
    views = [x, x.flip(-1)]  # per-peer views: each peer reconstructs its own
    expected = sum(((r - v) ** 2).mean() for r, v in zip(recon, views))
    torch.testing.assert_close(term(out, {**batch, "input": views})["loss"], expected)
    with pytest.raises(UserError, match=r"objective\.terms\.1\.tap: peer0 pre_logits is \[64\], not a \[C, H, W\] map"):
        train_steps(["objective.terms=[{name: ce}, {name: reconstruction, tap: pre_logits}]"], steps=0)


# ---------------------------------------------------------------------------------------------- LW-KD
def test_composed_digits_teacher_learns_quickly(lightweight_teacher):
    import json

    summary = json.loads((Path(lightweight_teacher) / "summary.json").read_text())
    assert summary["peers"][0]["final_test_top1"] >= 95.0


def test_lwkd_trains_without_running_the_teacher_on_the_batch(lightweight_teacher):
    s = train_steps([teachers(lw=lightweight_teacher), LWKD], steps=3)
    assert_teachers_untouched(s)
    b = s.trainer
    obj, term = b.objective, b.objective.terms[1]
    outside_peer_optimizer(obj, term)
    assert adam_steps(obj, term) == {3} and all(p.grad is None for p in term.discriminators.parameters())
    x, _ = one_batch(b)
    teach = obj.teach(x, 0, 0.0)
    assert teach.logits == {} and teach.taps == {}  # teacher_taps empty: the teacher never saw the batch
    for log in s.logs:  # weight·loss = α·τ²KL + λ_adv·BCE with α = 0.9, λ_adv = 0.1
        assert 0.9 * log["loss/lwkd"] == pytest.approx(0.9 * log["lwkd/kl"] + 0.1 * log["lwkd/adversarial"], rel=1e-5)
        assert 0 < log["lwkd/discriminator"] < 2


def test_lwkd_targets_are_class_conditioned_redrawn_and_resume_exactly(lightweight_teacher):
    term = train_steps([teachers(lw=lightweight_teacher), LWKD], steps=0).trainer.objective.terms[1]
    y = torch.arange(10).repeat(20)
    state = term.get_extra_state()  # {} before the first draw: a fresh seeded generator
    a, b = term.teacher_logits(0, y), term.teacher_logits(0, y)
    assert (a.argmax(1) == y).float().mean() >= 0.9 and (b.argmax(1) == y).float().mean() >= 0.9
    assert (a - b).abs().amax(1).gt(1e-4).float().mean() > 0.9  # the same labels, other images
    term.set_extra_state(state)
    torch.testing.assert_close(term.teacher_logits(0, y), a)
    state = term.get_extra_state()
    c = term.teacher_logits(0, y)
    term.set_extra_state(state)
    torch.testing.assert_close(term.teacher_logits(0, y), c)


@pytest.mark.parametrize("teacher, term, match", [
    ("teachers=[{arch: cifar_resnet8}]", "{name: lwkd}",
     r"objective\.terms\.1 \(lwkd\): teacher0 must be a mutualkd run"),
    (None, "{name: lwkd, weight: 0.0}", r"objective\.terms\.1\.weight: lwkd's weight is α and must be > 0"),
])
def test_lwkd_user_errors_name_the_key(lightweight_teacher, teacher, term, match):
    with pytest.raises(UserError, match=match):
        train_steps([teacher or teachers(lw=lightweight_teacher), f"objective.terms=[{{name: ce}}, {term}]"], steps=0)


# -------------------------------------------------------------------------------------- resume and export
def test_resume_restores_discriminators_and_their_optimizers_exactly_and_export_leaves_them_out(
        tmp_path, digits_teacher):
    run = [teachers(t=digits_teacher), "train.epochs=1",
           "objective.terms=[{name: ce}, {name: reconstruction}, {name: complementary}]"]
    full = train(tmp_path / "full", *run, "train.max_steps=4")
    part = train(tmp_path / "part", *run, "train.max_steps=2")
    phase = "complementary/discriminator"  # the discriminators' own optimizer, saved beside the peers'
    mid = checkpoint.load(part / "checkpoints" / "last.pt")
    assert {int(s["step"]) for s in mid["phases"][phase]["state"].values()} == {2}
    assert main(["train", "--resume", str(part), "train.max_steps=4"]) == 0
    wa, wb = (checkpoint.load(r / "checkpoints" / "last.pt") for r in (full, part))
    assert wb["step"] == 4
    for name, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][name]), name
    assert wa["objective"].keys() == wb["objective"].keys()
    for name, value in wa["objective"].items():
        if not name.endswith("_extra_state"):
            assert torch.equal(value, wb["objective"][name]), name
    assert wa["phases"][phase]["state"]
    for k, (sa, sb) in enumerate(zip(wa["phases"][phase]["state"].values(), wb["phases"][phase]["state"].values())):
        assert int(sa["step"]) == int(sb["step"]) == 4
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"]), k
    assert main(["export", str(part), "--peer", "0", "--checkpoint", "last"]) == 0
    exported = load_file(str(part / "exports" / "peer0.safetensors"))
    peer_keys = {k.removeprefix("peers.0.") for k in wb["model"] if k.startswith("peers.0.")}
    assert set(exported) == peer_keys
    assert not any(w in k for k in exported for w in ("discriminator", "decoder", "align"))


def test_discriminators_stay_identical_across_ranks(tmp_path, digits_teacher, lightweight_teacher):
    """Two gloo processes: data_parallel averages D's gradients (and its BatchNorm statistics before a checkpoint);
    under peer_parallel every rank steps LW-KD's D on the same all-gathered logits and targets. The trainer
    stops a run whose objective state differs across ranks; the per-rank sums are compared here as well."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name, args in [("dp", ["data.batch_size=32", teachers(t=digits_teacher),
                               "objective.terms=[{name: ce}, {name: reconstruction}, {name: complementary}]"]),
                       ("pp", ["placement=peer_parallel", teachers(lw=lightweight_teacher), LWKD])]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mutualkd",
               "train", QUIET, "train.max_steps=6", *args, "--run-dir", str(tmp_path / name)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        ranks = checkpoint.load(tmp_path / name / "checkpoints" / "last.pt")["ranks"]
        sums = [r["state_sums"] for r in ranks]
        assert sums[0] == sums[1] and any(".discriminators.1_0.net." in k for k in sums[0]), name


# ------------------------------------------------------------------------------------- composed_digits
def digit_labels() -> dict[bytes, set[int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.data * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    table: dict[bytes, set[int]] = {}
    for img, label in zip(pixels, d.target):
        table.setdefault(img.tobytes(), set()).add(int(label))
    return table


def test_composed_digits_shapes_classes_and_labels():
    table = digit_labels()

    def shows(images: torch.Tensor, labels: torch.Tensor) -> bool:
        return all(int(y) in table.get(img.numpy().tobytes(), set()) for img, y in zip(images, labels))

    ten = load_splits("composed_digits", composed={"num_classes": 10})
    assert (ten.spec.num_classes, ten.spec.in_chans, ten.spec.image_size) == (10, 1, (16, 16))
    for part in (ten.train, ten.val, ten.test):
        assert part.images.dtype == torch.uint8 and part.images.shape[1:] == (1, 16, 16)
        assert sorted(part.targets.unique().tolist()) == list(range(10))
        assert shows(part.images[:, 0, ::2, ::2], part.targets)  # digit y, scaled x2 (nearest)
    assert len(ten.train) + len(ten.val) + len(ten.test) == 1797
    hundred = load_splits("composed_digits", composed={"num_classes": 100}, val_split=0.0)
    assert hundred.spec.num_classes == 100 and hundred.train.images.shape[1:] == (1, 16, 16)
    digits_test = {img.numpy().tobytes() for img in load_splits("digits", val_split=0.0).test.images[:, 0]}
    for part, n in ((hundred.train, 144), (hundred.test, 36)):
        assert torch.equal(torch.bincount(part.targets), torch.full((100,), n))
        rows = part.images[:, 0, 4:12]
        assert shows(rows[:, :, :8], part.targets // 10) and shows(rows[:, :, 8:], part.targets % 10)
        assert part.images[:, :, :4].sum() == 0 and part.images[:, :, 12:].sum() == 0
        from_test = {img.numpy().tobytes() in digits_test for img in torch.cat([rows[:, :, :8], rows[:, :, 8:]])}
        assert from_test == {part is hundred.test}  # train and test compose disjoint digit pools
    again = load_splits("composed_digits", composed={"num_classes": 100}, val_split=0.0)
    assert torch.equal(again.train.images, hundred.train.images) and again.spec == hundred.spec
    with pytest.raises(UserError, match=r"data\.composed\.image_size: two-digit classes"):
        load_splits("composed_digits", composed={"num_classes": 11, "image_size": 8})
    with pytest.raises(UserError, match=r"data\.composed\.num_classes"):
        C.load_config(None, ["data.name=composed_digits", "data.composed.num_classes=101"])
