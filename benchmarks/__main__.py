"""`python -m benchmarks [--scenario NAME ...] [--steps N] [--warmup N] [--rounds N] [--batch-size B]
[--threads T] [--set KEY=VALUE ...] [--device cpu|cuda] [--out results.json] [--profile profile.txt]`

Each scenario runs in a fresh Python process (so peak-memory figures of one scenario do not inherit
another's), prints a table and writes one JSON file with every result and the machine description.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import scenarios as S


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", default=None, metavar="NAME",
                    help=f"repeatable; one of {', '.join(S.SCENARIOS)}, or a group: p_scaling, mcl_okd, all "
                         "(default: all but smoke)")
    ap.add_argument("--steps", type=int, help="measured steps per round (default: per scenario)")
    ap.add_argument("--warmup", type=int, help="untimed steps before the rounds (default: per scenario)")
    ap.add_argument("--rounds", type=int, help="alternating group / single-model rounds (default: per scenario)")
    ap.add_argument("--batch-size", type=int, help="per-process batch (default: per scenario, 64)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                    help="repeatable; an extra dotted config override for every selected scenario "
                         "(e.g. --set train.deterministic=false); recorded in the results")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: what Accelerate picks (cuda if present)")
    ap.add_argument("--measure-every-peer", action="store_true",
                    help="run a single-model baseline for every peer, not once per distinct architecture")
    ap.add_argument("--in-process", action="store_true",
                    help="run every scenario in this process (peak-memory figures then include earlier scenarios)")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="instead of benchmarking, profile the group step of each scenario with torch.profiler "
                         "and write the top ops to FILE")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one scenario for a parent run
    return ap.parse_args(argv)


def _settings(sc: S.Scenario, a: argparse.Namespace) -> dict:
    return {"steps": a.steps or sc.steps, "warmup": sc.warmup if a.warmup is None else a.warmup,
            "rounds": a.rounds or sc.rounds, "batch_size": a.batch_size or sc.batch_size}


def _child_argv(sc: S.Scenario, a: argparse.Namespace, out: str) -> list[str]:
    st = _settings(sc, a)
    argv = [sys.executable, "-m", "benchmarks", "--child", "--in-process", "--scenario", sc.name, "--out", out,
            "--steps", str(st["steps"]), "--warmup", str(st["warmup"]), "--rounds", str(st["rounds"]),
            "--batch-size", str(st["batch_size"])]
    if a.threads:
        argv += ["--threads", str(a.threads)]
    for item in a.extra:
        argv += ["--set", item]
    if a.device:
        argv += ["--device", a.device]
    if a.measure_every_peer:
        argv.append("--measure-every-peer")
    if a.quiet:
        argv.append("--quiet")
    return argv


def run_in_process(sc: S.Scenario, a: argparse.Namespace) -> dict:
    from benchmarks.harness import run_scenario

    st = _settings(sc, a)
    log = None if a.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        return run_scenario(sc.name, sc.overrides + a.extra, sc.config_path(), steps=st["steps"], warmup=st["warmup"],
                            rounds=st["rounds"], batch_size=st["batch_size"], threads=a.threads, device=a.device,
                            dedup_singles=not a.measure_every_peer, description=sc.description, log=log)
    except Exception as err:  # one failing scenario must not lose the others' results
        import traceback

        traceback.print_exc()
        return {"scenario": sc.name, "error": f"{type(err).__name__}: {err}"}


def run_in_child(sc: S.Scenario, a: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(a.threads)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        proc = subprocess.run(_child_argv(sc, a, out), env=env, cwd=root)
        if proc.returncode != 0 or not os.path.exists(out):
            return {"scenario": sc.name, "error": f"benchmark process exited with code {proc.returncode}"}
        return json.loads(Path(out).read_text())["results"][0]


def profile(scs: list[S.Scenario], a: argparse.Namespace) -> int:
    from benchmarks.harness import profile_scenario

    texts = []
    for sc in scs:
        st = _settings(sc, a)
        texts.append(profile_scenario(sc.name, sc.overrides + a.extra, sc.config_path(), steps=st["steps"],
                                      warmup=st["warmup"], batch_size=st["batch_size"], threads=a.threads,
                                      device=a.device, rows=a.profile_rows, description=sc.description))
        print(texts[-1])
    a.profile.parent.mkdir(parents=True, exist_ok=True)
    a.profile.write_text("\n\n".join(texts) + "\n")
    print(f"wrote {a.profile}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.list:
        for sc in S.SCENARIOS.values():
            groups = f"  [{', '.join(sc.groups)}]" if sc.groups else ""
            print(f"{sc.name:22s} {sc.description}{groups}")
        return 0
    scs = S.select(a.scenario)
    if a.profile:
        return profile(scs, a)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    results = [run_in_process(sc, a) if a.in_process else run_in_child(sc, a) for sc in scs]
    from benchmarks.harness import format_table, machine_info

    doc = {
        "command": "python -m benchmarks " + " ".join(shlex.quote(x) for x in (argv if argv is not None
                                                                              else sys.argv[1:])),
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": machine_info(),
        "isolation": "in-process" if a.in_process else "one subprocess per scenario",
        "results": results,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
    if not a.child:
        print(format_table(results))
        if a.out:
            print(f"wrote {a.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
