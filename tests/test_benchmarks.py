"""The benchmark harness (benchmarks/): result structure and internal consistency on a tiny scenario.

No timing thresholds: only that the numbers exist, are positive and add up.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a top-level folder of the repository, not an installed package

from benchmarks import scenarios as S  # noqa: E402
from benchmarks.__main__ import main as bench_main  # noqa: E402
from benchmarks.harness import PHASES, StepTimer, run_scenario, single_model_config  # noqa: E402
from mutualkd.config import load_config  # noqa: E402


def check_result(r: dict, P: int, batch: int, steps: int, rounds: int) -> None:
    assert "error" not in r, r.get("error")
    for key in ("scenario", "overrides", "device", "torch_version", "threads", "batch", "P", "images_per_s",
                "step_ms", "breakdown_ms", "peak_mem_mb", "peak_mem_increase_mb", "memory_method",
                "single_model_step_ms", "overhead_ratio", "overhead_ratio_per_round", "machine"):
        assert key in r, key
    assert r["P"] == P and r["batch"] == batch and r["threads"] >= 1 and r["device"] == "cpu"
    s = r["step_ms"]
    assert s["n_steps"] == steps * rounds and len(s["per_round_median"]) == rounds
    assert 0 < s["p10"] <= s["median_all_steps"] <= s["p90"]
    assert set(r["breakdown_ms"]) == set(PHASES) and all(v >= 0 for v in r["breakdown_ms"].values())
    # medians of the phases need not add up to the median step exactly; they must be of the same size
    assert 0.5 * s["median"] <= sum(r["breakdown_ms"].values()) <= 2.0 * s["median"]
    assert math.isclose(r["images_per_s"], batch * 1e3 / s["median"], rel_tol=1e-9)
    assert len(r["single_model_step_ms"]) == P and all(v > 0 for v in r["single_model_step_ms"].values())
    assert math.isclose(r["single_model_sum_ms"], sum(r["single_model_step_ms"].values()), rel_tol=1e-9)
    assert r["overhead_ratio"] > 0 and math.isclose(r["overhead_ratio"], s["median"] / r["single_model_sum_ms"])
    assert len(r["overhead_ratio_per_round"]) == rounds and all(x > 0 for x in r["overhead_ratio_per_round"])
    assert r["peak_mem_mb"] > 0 and r["peak_mem_increase_mb"] >= 0 and r["losses_finite"]
    assert r["machine"]["cpu_count"] >= 1 and r["machine"]["torch_threads"] >= 1
    json.dumps(r)  # JSON-ready


def test_tiny_scenario_in_process_gives_a_consistent_record():
    sc = S.SCENARIOS["smoke"]
    r = run_scenario("tiny", sc.overrides, None, steps=2, warmup=1, rounds=2, batch_size=8)
    check_result(r, P=2, batch=8, steps=2, rounds=2)
    # identical archs: one baseline run, used for both peers
    assert len(r["single_models"]) == 1 and r["single_models"][0]["peers"] == ["peer0", "peer1"]
    assert r["single_models"][0]["arch"] == "cifar_resnet8" and r["terms"] == ["ce", "dml"]


def test_every_peer_measured_separately_on_request():
    overrides = S.SCENARIOS["smoke"].overrides + ["peers.1.arch=cifar_resnet14"]
    r = run_scenario("mixed", overrides, None, steps=1, warmup=0, rounds=1, batch_size=4, dedup_singles=False)
    check_result(r, P=2, batch=4, steps=1, rounds=1)
    assert [s["arch"] for s in r["single_models"]] == ["cifar_resnet8", "cifar_resnet14"]


def test_cli_writes_json_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "res.json"
    assert bench_main(["--scenario", "smoke", "--in-process", "--quiet", "--set", "train.optimizer.lr=0.05",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu_count"] >= 1 and "platform" in doc["machine"] and doc["command"].startswith("python")
    sc = S.SCENARIOS["smoke"]
    r = doc["results"][0]
    check_result(r, P=2, batch=sc.batch_size, steps=sc.steps, rounds=sc.rounds)
    assert "train.optimizer.lr=0.05" in r["overrides"] and r["resolved_config"]["train"]["optimizer"]["lr"] == 0.05
    text = capsys.readouterr().out
    assert "smoke" in text and "ratio" in text and "img/s" in text


def test_default_mode_runs_each_scenario_in_a_subprocess(tmp_path):
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--scenario", "smoke", "--steps", "1", "--warmup",
                           "0", "--threads", "1", "--quiet", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["isolation"] == "one subprocess per scenario"
    r = doc["results"][0]
    check_result(r, P=2, batch=8, steps=1, rounds=1)
    assert r["threads"] == 1


def test_step_timer_phases_tile_the_step():
    import torch

    t = StepTimer(torch.device("cpu"))
    t.start()
    for phase in ("data", "forward", "losses", "backward", "losses", "optimizer"):
        t.mark(phase)
    rec = t.finish()
    assert set(rec) == set(PHASES) | {"step"}
    assert math.isclose(sum(rec[p] for p in PHASES), rec["step"], rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("name", [n for n in S.SCENARIOS])
def test_every_scenario_config_is_valid(name):
    sc = S.SCENARIOS[name]
    cfg = load_config(sc.config_path(), sc.overrides)
    assert cfg.data.name == "synthetic"
    single = single_model_config(cfg, len(cfg.peers) - 1)
    assert len(single.peers) == 1 and single.topology.kind == "independent"
    assert [t.name for t in single.objective.terms] == ["ce"] and single.embedding.head == "none"
    assert single.peers[0].arch == cfg.peers[-1].arch and single.data == cfg.data.model_copy(update={"views": "shared"})


def test_named_scenarios_and_groups():
    assert [(s.name, len(load_config(s.config_path(), s.overrides).peers)) for s in S.select(["p_scaling"])] == [
        ("dml_p2", 2), ("dml_p4", 4), ("dml_p8", 8)]
    okd = {s.name: load_config(s.config_path(), s.overrides) for s in S.select(["mcl_okd"])}
    assert {n: c.objective.terms[2].K for n, c in okd.items()} == {"mcl_okd_k256": 256, "mcl_okd_k16384": 16384}
    assert all(c.topology.kind == "shared_stem" and len(c.peers) == 4 for c in okd.values())
    dm = load_config(S.SCENARIOS["dml_mcl_x4"].config_path(), S.SCENARIOS["dml_mcl_x4"].overrides)
    assert [t.name for t in dm.objective.terms] == ["ce", "dml", "mcl"] and len(dm.peers) == 4
    assert dm.topology.kind == "independent"
    tm = load_config(S.SCENARIOS["timm_resnet18_dml_x2"].config_path(), S.SCENARIOS["timm_resnet18_dml_x2"].overrides)
    assert [p.arch for p in tm.peers] == ["resnet18", "resnet18"]
    assert "smoke" not in [s.name for s in S.select(None)]
    with pytest.raises(SystemExit):
        S.select(["nope"])
