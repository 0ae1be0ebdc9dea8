"""The term registry, plugins, config bases and `mutualkd config show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mutualkd import config as C
from mutualkd.errors import UserError
from mutualkd.registry import TERMS, load_plugin, register_term

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "logit_mse.py"


def cli(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "mutualkd", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, **(env or {})})
    return r.returncode, r.stdout, [line for line in r.stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- registry
def test_every_built_in_term_is_registered_once_with_its_own_module_and_schema():
    names = TERMS.names()
    assert names[:5] == ["ce", "dml", "dot", "mcl", "mcl_okd"] and len(names) == len(set(names)) == 20
    for spec in TERMS.specs():
        assert spec.config.model_fields["name"].default == spec.name == spec.term.name
        assert spec.config.__module__ == spec.term.__module__  # one file per method: schema and term together
        assert spec.source.startswith("mutualkd.losses.")
    assert {s.name for s in TERMS.specs() if s.term.needs_teacher} == {
        "kd", "fitnet", "at", "fsp", "nst", "relation", "sp", "rkd", "pkt", "cc", "adain", "ama", "complementary",
        "lwkd"}
    assert {s.name for s in TERMS.specs() if s.term.needs_embeddings} == {"mcl", "mcl_okd"}
    assert {s.name for s in TERMS.specs() if s.term.peer_parallel} == {"ce", "dml", "dot", "mcl", "mcl_okd", "kd",
                                                                       "lwkd"}


def test_registering_a_name_twice_or_a_mismatched_schema_is_an_error():
    from mutualkd import Term, TermConfig

    class CEAgain(TermConfig):
        name: Literal["ce"] = "ce"

    with pytest.raises(UserError, match=r"term 'ce' is already registered \(by mutualkd\.losses\.ce\)"):
        register_term("ce", CEAgain)(type("CE2", (Term,), {}))

    class Wrong(TermConfig):
        name: Literal["other"] = "other"

    with pytest.raises(TypeError, match=r'must declare `name: Literal\["mine"\] = "mine"`'):
        register_term("mine", Wrong)(type("Mine", (Term,), {}))
    assert TERMS.get("mine") is None


def test_the_config_union_comes_from_the_registry():
    cfg = C.load_config(None, ["objective.terms=[{name: ce}, {name: pkt}]", "teachers=[{arch: cifar_resnet8}]"])
    assert [type(t).__name__ for t in cfg.objective.terms] == ["CEConfig", "PKTConfig"]
    assert cfg.objective.terms[1].weight == 30000.0  # the schema's default, from the method's own module
    with pytest.raises(UserError, match=r"objective\.terms\.1\.name: unknown term 'nope'; expected one of 'ce'"):
        C.load_config(None, ["objective.terms.1.name=nope"])
    with pytest.raises(UserError, match=r"objective\.terms\.1\.Tx: unknown key \(did you mean 'T'\?\); allowed "
                                        r"keys: T, name, ramp, reduction, update_mode, weight$"):
        C.load_config(None, ["objective.terms.1.Tx=2"])


# -------------------------------------------------------------------------------------------- plugins
def test_the_plugin_example_trains_by_name(tmp_path):
    run = tmp_path / "run"
    rc, out, err = cli("train", "--plugin", str(PLUGIN), "examples/logit_mse.yaml", "train.max_steps=6",
                       "train.log_every=3", "train.progress=false", "--run-dir", str(run))
    assert rc == 0, err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["train"] for r in records if "train" in r]
    assert len(logged) == 2 and {"loss/logit_mse", "logit_mse/peer0", "logit_mse/peer1"} <= set(logged[0])
    assert logged[1]["loss/logit_mse"] < logged[0]["loss/logit_mse"]  # the peers' logits move together
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["objective"]["terms"][1] == {"name": "logit_mse", "weight": 0.5, "leave_one_out": True,
                                              "ramp": {"shape": "constant", "epochs": 0.0}}
    # the run resumes like any other, given the plugin again
    assert cli("train", "--plugin", str(PLUGIN), "--resume", str(run), "train.epochs=1")[0] == 0


def test_the_plugins_term_matches_its_formula():
    import torch

    load_plugin(str(PLUGIN))
    load_plugin(str(PLUGIN))  # loading it again is a no-op, not a second registration
    from mutualkd.losses.base import BuildContext
    from mutualkd.peers import GroupOutput

    spec = TERMS.get("logit_mse")
    ctx = BuildContext(peer_names=["a", "b", "c"], num_classes=4, train_targets=torch.zeros(4), embedding_dim=None,
                       seed=0)
    z = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    for loo in (False, True):
        term = spec.term(spec.config(leave_one_out=loo), ctx, "objective.terms.1")
        got = term(GroupOutput(logits=z, pre_logits=[]), {})["per_peer"]
        want = [((z[p] - (z.sum(0) - z[p]) / 2 if loo else z[p] - z.mean(0)) ** 2).mean() for p in range(3)]
        torch.testing.assert_close(got, torch.stack(want))


@pytest.mark.parametrize("args, culprit", [
    (["--plugin", str(PLUGIN), "examples/logit_mse.yaml", "objective.terms.1.scale=2"],
     "objective.terms.1.scale: unknown key; allowed keys: leave_one_out, name, ramp, weight"),
    (["examples/logit_mse.yaml"], "objective.terms.1.name: unknown term 'logit_mse'"),
    (["--plugin", "no/such/plugin.py"], "--plugin: no such file: no/such/plugin.py"),
    (["--plugin", "no_such_module_xyz"], "--plugin: no module named 'no_such_module_xyz'"),
])
def test_plugin_errors_are_one_line_with_exit_2(tmp_path, args, culprit):
    rc, _, err = cli("train", *args, "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and len(err) == 1 and err[0].startswith("mutualkd: error: ") and culprit in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_plugin_can_be_a_module_name_and_its_own_errors_are_named(tmp_path):
    (tmp_path / "broken_terms.py").write_text("raise RuntimeError('the plugin is broken')\n")
    env = {"PYTHONPATH": f"{ROOT / 'examples'}{os.pathsep}{tmp_path}"}
    rc, out, err = cli("config", "show", "--plugin", "logit_mse", "examples/logit_mse.yaml", env=env)
    assert rc == 0 and "logit_mse" in out, err
    rc, _, err = cli("config", "show", "--plugin", "broken_terms", env=env)
    assert rc == 2 and err == ["mutualkd: error: --plugin broken_terms: the plugin is broken"]


# -------------------------------------------------------------------------------------- bases, show
def test_a_config_overrides_its_base_chain_key_by_key(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "root.yaml").write_text("seed: 3\ntrain: {epochs: 5, optimizer: {lr: 0.2, momentum: 0.5}}\n"
                                                "peers: [{arch: cifar_resnet8}, {arch: cifar_resnet14}]\n")
    (tmp_path / "lib" / "mid.yaml").write_text("base: root.yaml\ntrain: {optimizer: {lr: 0.05}}\n")
    (tmp_path / "leaf.yaml").write_text("base: lib/mid.yaml\npeers: [{arch: wrn_16_1}]\ntrain: {epochs: 2}\n")
    cfg = C.load_config(tmp_path / "leaf.yaml", ["train.optimizer.momentum=0.8"])
    assert cfg.seed == 3 and cfg.train.epochs == 2
    assert (cfg.train.optimizer.lr, cfg.train.optimizer.momentum) == (0.05, 0.8)  # merged, then overridden
    assert [p.arch for p in cfg.peers] == ["wrn_16_1"]  # lists are replaced whole
    (tmp_path / "lib" / "root.yaml").write_text("base: ../leaf.yaml\n")
    with pytest.raises(UserError, match=r"leaf\.yaml: base: the configs name each other in a cycle"):
        C.load_config(tmp_path / "lib" / "mid.yaml")
    (tmp_path / "lib" / "mid.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(UserError, match=r"mid\.yaml: base: config file not found: .*missing\.yaml"):
        C.load_config(tmp_path / "leaf.yaml")


def test_the_repdistiller_method_configs_are_deltas_on_one_base():
    configs = sorted((ROOT / "configs").glob("cifar100_r32x4_r8x4_*.yaml"))
    assert len(configs) == 13
    for path in configs:
        assert C.read_yaml(path)["base"] == "base/cifar100_r32x4_r8x4.yaml" and len(path.read_text().splitlines()) < 25
        cfg = C.load_config(path)
        assert cfg.data.name == "cifar100" and cfg.train.optimizer.lr == 0.05 and cfg.peers[0].arch == "cifar_resnet8x4"


def test_config_show_prints_the_resolved_config_with_every_default():
    rc, out, err = cli("config", "show", "configs/cifar100_r32x4_r8x4_fsp.yaml", "seed=4")
    assert rc == 0, err
    tree = yaml.safe_load(out)
    assert "base" not in tree and tree["seed"] == 4 and tree["train"]["epochs"] == 270
    assert tree["train"]["schedule"] == {**C.ScheduleConfig().model_dump(), "name": "step",
                                         "milestones": [180, 210, 240]}
    assert tree["objective"]["terms"][0]["adapter"] == "none"  # a default the file never names
    assert C.validate(tree) == C.load_config(ROOT / "configs" / "cifar100_r32x4_r8x4_fsp.yaml", ["seed=4"])
    rc, _, err = cli("config", "show", "train.epochz=1")
    assert rc == 2 and "train.epochz: unknown key" in err[0]
