"""End to end on real data: training, resume equality, checkpoints, eval, export, tracking, shipped configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes import write_cifar

from mutualkd.cli import main
from mutualkd.engine import checkpoint
from mutualkd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")

# Two small peers with every stateful piece in play: per-peer views, dropout, embeddings, a memory bank with
# its negative sampler, DOT and DML.
STATEFUL = ["train.epochs=3", "train.progress=false", "train.log_every=5", "data.views=per_peer",
            "peers.0.model_kwargs={drop_rate: 0.3}",  # dropout draws from the global RNG
            "embedding.head=linear", "embedding.dim=32",
            "objective.terms=[{name: ce}, {name: dml}, {name: dot, targets: all}, {name: mcl_okd, K: 64}]"]


def train(run_dir, *overrides):
    assert main(["train", *overrides, "--run-dir", str(run_dir)]) == 0
    return run_dir


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_run_learns_digits_and_writes_a_complete_run_dir(tmp_path, capsys):
    run = train(tmp_path / "run", "train.progress=false")
    s = summary(run)
    for peer in s["peers"]:
        assert peer["arch"] == "cifar_resnet8" and peer["params"] == 77_754
        assert peer["final_test_top1"] >= 95.0, peer
        assert peer["val_selected_test_top1"] is not None and 1 <= peer["selected_epoch"] <= 12
    assert s["ensemble"]["final_test_top1"] >= 95.0 and s["epochs"] == 12
    out = capsys.readouterr().out
    assert "val-selected test (epoch)" in out and "ensemble" in out
    recs = records(run)
    evals = [r for r in recs if "eval" in r]
    assert [r["epoch"] for r in evals] == list(range(1, 13))
    assert all(r["eval"]["test"]["n"] == 359 and r["eval"]["val"]["n"] == 143 for r in evals)
    train_recs = [r for r in recs if "train" in r]
    assert train_recs[0]["train"]["loss"] > train_recs[-1]["train"]["loss"]
    assert {"loss/ce", "loss/dml", "ce/peer0", "dml/peer1"} <= set(train_recs[0]["train"])
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert (run / "config.yaml").is_file()


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    full = train(tmp_path / "full", *STATEFUL)
    part = train(tmp_path / "part", *STATEFUL, "train.max_steps=27")  # stops inside epoch 2
    assert not (part / "summary.json").exists()
    state = checkpoint.load(part / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 7, 27)
    assert main(["train", "--resume", str(part)]) == 0
    a, b = summary(full), summary(part)
    for key in ("peers", "ensemble", "epochs"):
        assert a[key] == b[key]
    wa = checkpoint.load(full / "checkpoints" / "last.pt")
    wb = checkpoint.load(part / "checkpoints" / "last.pt")
    for name, tensor in wa["model"].items():
        assert torch.equal(tensor, wb["model"][name]), name
    assert torch.equal(wa["objective"]["terms.3.banks"], wb["objective"]["terms.3.banks"])
    steps = [r["step"] for r in records(part) if "train" in r]
    assert steps == sorted(set(steps)) == [r["step"] for r in records(full) if "train" in r]


def test_resume_refuses_a_run_without_a_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 2


class Foreign:  # an arbitrary object: loading it would mean executing pickle code
    pass


def test_checkpoint_loading_refuses_foreign_corrupt_and_headerless_files(tmp_path):
    good = tmp_path / "good.pt"
    checkpoint.save({"x": torch.ones(2), "meta": {"a": [1, 2.5, "s", None]}}, good)
    assert torch.equal(checkpoint.load(good)["x"], torch.ones(2))
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": checkpoint.FORMAT, "version": 1, "obj": Foreign()}, unsafe)
    with pytest.raises(UserError, match="refused to load: it holds objects other than tensors"):
        checkpoint.load(unsafe)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        checkpoint.load(cut)
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.zeros(1)}, bare)
    with pytest.raises(UserError, match="not a mutualkd checkpoint"):
        checkpoint.load(bare)
    with pytest.raises(UserError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save({"x": torch.zeros(1)}, path)

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(path, fail)
    assert torch.equal(checkpoint.load(path)["x"], torch.zeros(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def run_python(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("overrides, peer, import_line", [
    (["topology.kind=shared_stem", "peers.2.arch=cifar_resnet8"], "2", "import timm, mutualkd.models"),
    (["peers.1.arch=resnet18", "peers.1.name=r18"], "r18", "import timm"),
])
def test_export_round_trip_through_plain_timm(tmp_path, overrides, peer, import_line):
    run = train(tmp_path / "run", "train.progress=false", "train.max_steps=3", *overrides)
    assert main(["export", str(run), "--peer", peer, "--checkpoint", "last"]) == 0
    from mutualkd.runs import group_from_state

    cfg, _, group = group_from_state(run, "last")
    k = int(peer) if peer.isdigit() else cfg.peer_names.index(peer)
    x = torch.randn(5, 1, 8, 8)
    torch.save({"x": x, "logits": group(x).logits[k]}, tmp_path / "expected.pt")
    info = run / "exports" / f"{cfg.peer_names[k]}.json"
    out = run_python(f"""
{import_line}
import json, sys, torch
info = json.load(open({str(info)!r}))
model = timm.create_model(info["arch"], pretrained=True, pretrained_cfg_overlay=info["pretrained_cfg"]).eval()
ref = torch.load("expected.pt")
with torch.no_grad():
    assert torch.allclose(model(ref["x"]), ref["logits"], atol=1e-5)
print(sorted(m for m in sys.modules if m.startswith("mutualkd")))
""", tmp_path)
    allowed = {"mutualkd", "mutualkd.models"} if "mutualkd" in import_line else set()
    assert {m for m in eval(out) if not m.startswith("mutualkd.models.")} <= allowed


def test_eval_command_reproduces_the_final_numbers(tmp_path, capsys):
    run = train(tmp_path / "run", "train.progress=false", "train.epochs=2")
    capsys.readouterr()
    assert main(["eval", str(run), "--checkpoint", "last", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    s = summary(run)
    assert result["test"]["top1"] == [p["final_test_top1"] for p in s["peers"]]
    assert result["test"]["ensemble_top1"] == s["ensemble"]["final_test_top1"]
    (run / "checkpoints" / "last.pt").write_bytes(b"garbage")
    assert main(["eval", str(run), "--checkpoint", "last"]) == 2
    assert main(["export", str(run), "--peer", "7"]) == 2


def test_wandb_offline_tracking_writes_its_run_and_the_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = train(tmp_path / "run", "train.progress=false", "train.max_steps=4", "train.log_every=2", "tracking=wandb")
    assert list((run / "wandb").glob("offline-run-*")), list(run.iterdir())
    assert len([r for r in records(run) if "train" in r]) == 2


def test_a_failing_tracker_never_stops_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(HOME=str(tmp_path), WANDB_MODE="online", WANDB_API_KEY="", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "mutualkd", "train", "train.progress=false", "train.epochs=1",
                        "tracking=wandb", "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tracking: wandb failed to start, continuing without it" in r.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


@needs_fashion
def test_fashion_mnist_mcl_learns_from_real_data(tmp_path):
    run = train(tmp_path / "run", str(ROOT / "configs" / "fashion_mnist_mcl.yaml"), "train.max_steps=40",
                "train.log_every=10", "train.progress=false")
    losses = [r["train"] for r in records(run) if "train" in r]
    assert len(losses) == 4 and losses[-1]["loss/ce"] < 0.75 * losses[0]["loss/ce"]
    assert all(v == v for v in losses[-1].values())  # no NaN in any logged part


def test_bf16_autocast_and_gradient_accumulation_run_on_cpu(tmp_path):
    run = train(tmp_path / "run", "train.progress=false", "train.epochs=1", "train.mixed_precision=bf16",
                "train.grad_accum=3", "train.clip_grad_norm=1.0")
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 7  # 20 batches in groups of 3 -> 7 optimizer steps
    assert summary(run)["ensemble"]["final_test_top1"] > 10.0


# Teacher runs named by the shipped student configs, and the shipped config that trains each one
TEACHER_CONFIGS = {"runs/cifar100_resnet32x4": "cifar100_teacher_resnet32x4", "runs/fm_teacher": "fashion_mnist_teacher",
                   "runs/cifar100_resnet32x4_recon": "cifar100_teacher_resnet32x4_recon",
                   "runs/lwkd_teacher_c100": "cifar100_teacher_lwkd_composed_digits"}


@pytest.fixture(scope="module")
def shipped_teachers(tmp_path_factory):
    """Teacher run directories made on demand by running their shipped config for one step (cached per module)."""
    made = {}

    def get(run: str, extra: list[str]) -> str:
        if run not in made:
            if run not in TEACHER_CONFIGS:
                raise AssertionError(f"a shipped config names teacher run {run!r}; add its config to TEACHER_CONFIGS")
            out = tmp_path_factory.mktemp("teacher") / "run"
            train(out, str(ROOT / "configs" / f"{TEACHER_CONFIGS[run]}.yaml"), "train.max_steps=1",
                  "train.progress=false", *extra)
            made[run] = str(out)
        return made[run]

    return get


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_runs_one_step(tmp_path, name, shipped_teachers):
    """Each shipped config starts, takes one optimizer step and stops cleanly; student configs get their teacher
    runs from the shipped teacher configs (one step each), on CIFAR-100 files the test writes."""
    from mutualkd.config import resolve_yaml

    extra = []
    if name.startswith("cifar100"):
        write_cifar(tmp_path, "cifar100", n_per_file=1000)
        extra = [f"data.root={tmp_path}"]
    elif "fashion" in name or "timm" in name:
        if not FASHION.is_dir():
            pytest.skip("Debian's dataset-fashion-mnist is not installed")
    for i, t in enumerate(resolve_yaml(ROOT / "configs" / f"{name}.yaml").get("teachers", [])):
        if "run" in t:
            extra.append(f"teachers.{i}.run={shipped_teachers(t['run'], extra[:1])}")
    run = train(tmp_path / "run", str(ROOT / "configs" / f"{name}.yaml"), "train.max_steps=1",
                "train.progress=false", *extra)
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 1


def test_without_a_validation_split_eval_and_export_default_to_the_last_checkpoint(tmp_path, capsys):
    run = train(tmp_path / "run", "train.progress=false", "train.epochs=1", "data.val_split=0")
    assert not (run / "checkpoints" / "best.pt").exists()
    s = summary(run)
    assert s["peers"][0]["val_selected_test_top1"] is None  # reported as n/a, never selected on test
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["top1"] == [p["final_test_top1"] for p in s["peers"]]
    assert main(["export", str(run), "--peer", "peer1"]) == 0
    info = json.loads((run / "exports" / "peer1.json").read_text())
    assert info["source"].endswith("last.pt") and info["usage"].endswith("# after `import mutualkd.models`")


def test_compiled_training_matches_eager(tmp_path):
    """train.compile runs the same computation: the first logged losses agree."""
    args = ["train.progress=false", "train.max_steps=4", "train.log_every=2"]
    eager = train(tmp_path / "eager", *args)
    compiled = train(tmp_path / "compiled", *args, "train.compile=true")
    a = [r["train"]["loss"] for r in records(eager) if "train" in r]
    b = [r["train"]["loss"] for r in records(compiled) if "train" in r]
    assert len(a) == len(b) == 2
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
