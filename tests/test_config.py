"""Config schema, overrides and the one-line errors (exit code 2, no traceback, nothing written)."""

import subprocess
import sys
from pathlib import Path

import pytest

from mutualkd import config as C
from mutualkd.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_yaml_spells_out_the_schema_defaults():
    assert C.load_config(ROOT / "configs" / "quickstart.yaml") == C.Config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_round_trip(path):
    cfg = C.load_config(path)
    assert C.validate(C.yaml.safe_load(C.dump(cfg))) == cfg


def test_scientific_notation_without_a_dot_is_a_float():
    cfg = C.load_config(None, ["train.optimizer.lr=1e-3", "train.optimizer.weight_decay=5E-4", "train.clip_grad_norm=2e1"])
    assert (cfg.train.optimizer.lr, cfg.train.optimizer.weight_decay, cfg.train.clip_grad_norm) == (1e-3, 5e-4, 20.0)


def test_dotted_overrides_parse_yaml_values_and_reach_lists():
    cfg = C.load_config(None, ["peers.0.arch=resnet18", "train.epochs=2", "train.optimizer.lr=1",
                               "peers.2.arch=wrn_16_1", "tracking=wandb", "objective.terms=[{name: ce}]"])
    assert [p.arch for p in cfg.peers] == ["resnet18", "cifar_resnet8", "wrn_16_1"]
    assert [p.name for p in cfg.peers] == ["peer0", "peer1", "peer2"]
    assert cfg.train.epochs == 2 and cfg.train.optimizer.lr == 1.0
    assert cfg.tracking.backend == "wandb"
    assert [t.name for t in cfg.objective.terms] == ["ce"]


@pytest.mark.parametrize("overrides, message", [
    (["train.epochz=3"], r"train\.epochz: unknown key \(did you mean 'epochs'\?\); allowed keys: .*epochs"),
    (["data.name=digitz"], r"data\.name: .*'digits', 'fashion_mnist', 'cifar10', 'cifar100', 'imagefolder', 'synthetic' or 'composed_digits' \(got 'digitz'\)"),
    (["train.epochs=abc"], r"train\.epochs: input should be a valid integer \(got 'abc'\)"),
    (["train.epochs=2.5"], r"train\.epochs: input should be a valid integer \(got 2.5\)"),
    (["data.augment=3"], r"data\.augment: input should be a valid boolean \(got 3\)"),
    (["objective.terms.1.T=-1"], r"objective\.terms\.1\.T: input should be greater than 0 \(got -1\)"),
    (["objective.terms.1.name=dmll"], r"objective\.terms\.1\.name: unknown term 'dmll'; expected one of 'ce', 'dml', 'dot', 'mcl', 'mcl_okd'"),
    (["objective.terms.0.temperature=2"], r"objective\.terms\.0\.temperature: unknown key; allowed keys: label_smoothing, name, ramp, weight"),
    (["data.val_split=0.6"], r"data\.val_split: input should be less than 0\.5 \(got 0\.6\)"),
    (["peers.1.name=peer0"], r"peers\.1\.name: duplicate peer name 'peer0'"),
    (["peers.7.arch=x"], r"override peers\.7\.arch: index 7 out of range \(peers has 2 entries\)"),
    (["train.epochs"], r"override 'train\.epochs': expected dotted\.key=value"),
    (["train.epochs.x=1"], r"override train\.epochs\.x: train\.epochs is a value, not a section"),
    (["embedding.head=mlp"], r"embedding\.head: 'mlp' heads would be trained by nothing"),
    (["train.optimizer.betas=[0.9, 1.5]"], r"train\.optimizer\.betas\.1: input should be less than 1"),
    (["placement=peer_parallel", "train.mixed_precision=fp16"], r"train\.mixed_precision: fp16 is not supported"),
    (["placement=model_parallel"], r"placement: input should be .data_parallel. or .peer_parallel."),
])
def test_bad_values_name_the_key_and_the_allowed_values(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        C.load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_unreadable_yaml_and_wrong_top_level(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml: unreadable YAML \(line \d+, column \d+\)"):
        C.load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        C.load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        C.load_config(tmp_path / "missing.yaml")


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mutualkd", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, culprit", [
    (["train", "train.epochz=1"], "train.epochz: unknown key"),
    (["train", "peers.0.arch=resnet1234"], "peers.0.arch: unknown model 'resnet1234'"),
    (["train", "objective.terms.1.name=foo"], "objective.terms.1.name: unknown term 'foo'"),
    (["train", "data.name=fashion_mnist", "data.root=/nonexistent/fm"], "data.root: /nonexistent/fm"),
    (["train", "data.name=cifar100"], "data.download"),
    (["train", "objective.terms.1={name: mcl}"], "objective.terms.1 (mcl): needs peer embeddings; set embedding.head"),
    (["train", "topology.kind=shared_stem", "peers.1.arch=wrn_16_1"], "topology.kind: shared_stem needs one architecture"),
    (["train", "topology.kind=shared_stem", "topology.split=3"], "topology.split: 3 shares every stage"),
    (["train", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
])
def test_cli_rejects_bad_input_with_one_line_and_exit_2(tmp_path, args, culprit):
    run_dir = tmp_path / "run"
    r = cli(*args, "--run-dir", str(run_dir), cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("mutualkd: error: ") and culprit in lines[0], lines[0]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    marker = run_dir / "checkpoints" / "last.pt"
    marker.write_bytes(b"precious")
    r = cli("train", "--run-dir", str(run_dir), cwd=ROOT)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert marker.read_bytes() == b"precious"
