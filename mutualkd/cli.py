"""Command line: `mutualkd train | eval | export | config show`. Parsing only; the work lives in the engine.

Any user error (bad config, missing data, foreign checkpoint, a broken plugin) prints one line and exits with
code 2 before training starts. `--plugin FILE|MODULE` (repeatable, on every command) imports a user's own terms
before the config is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mutualkd.errors import UserError, first_line


def _config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]` -> (config path or None, overrides)."""
    config_path, overrides = None, list(items)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"expected dotted.key=value overrides after the config file, got {bad[0]!r}")
    return config_path, overrides


def _train(args) -> int:
    from mutualkd import config as C
    from mutualkd.runs import run_config, without_hub_weights

    config_path, overrides = _config_and_overrides(args.items)
    if args.resume:
        if config_path:
            raise UserError("--resume takes its config from the run directory; give only key=value overrides")
        run_dir = Path(args.resume)
        if not any(o.startswith("train.max_steps=") for o in overrides):
            overrides.append("train.max_steps=null")  # max_steps stops one invocation, not the resumed run
        cfg = without_hub_weights(run_config(run_dir, overrides))
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise UserError(f"--resume: {run_dir} has no checkpoints/last.pt to resume from")
    else:
        cfg = C.load_config(config_path, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{cfg.data.name}")
        if any((run_dir / name).exists() for name in ("checkpoints", "summary.json", "config.yaml", "metrics.jsonl")):
            raise UserError(f"--run-dir: {run_dir} already holds a run; resume it with --resume {run_dir} "
                            "or choose another directory")
    from mutualkd.engine.trainer import train

    train(cfg, run_dir, resume=bool(args.resume))
    return 0


def _eval(args) -> int:
    from mutualkd.data import BatchAugment, load_splits
    from mutualkd.engine.evaluate import evaluate
    from mutualkd.engine.trainer import make_accelerator
    from mutualkd.placement import Placement
    from mutualkd.runs import group_from_state

    cfg, state, group = group_from_state(Path(args.run_dir), args.checkpoint)
    accelerator = make_accelerator(cfg)
    splits = load_splits(cfg.data)
    augment, group = BatchAugment(splits.spec), group.to(accelerator.device)
    results = {"checkpoint": args.checkpoint or "default", "epoch": state["epoch"], "step": state["step"]}
    for name, split in (("test", splits.test), ("val", splits.val)):
        if split is not None:
            results[name] = evaluate(group, split, augment, accelerator, Placement(), cfg.data.eval_batch_size,
                                     len(cfg.peers))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        which = args.checkpoint or "default"
        print(f"{args.run_dir}: checkpoint {which} (epoch {state['epoch']}, step {state['step']})")
        print(f"{'split':<6}" + "".join(f"{n:>12}" for n in cfg.peer_names) + f"{'ensemble':>12}")
        for split in ("test", "val"):
            if split in results:
                r = results[split]
                print(f"{split:<6}" + "".join(f"{a:>12.2f}" for a in r["top1"]) + f"{r['ensemble_top1']:>12.2f}")
    return 0


def _export(args) -> int:
    from mutualkd.export import export_peer

    path = export_peer(Path(args.run_dir), args.peer, args.checkpoint, Path(args.out) if args.out else None)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    print(json.loads(path.with_suffix(".json").read_text())["usage"])
    return 0


def _config(args) -> int:
    from mutualkd import config as C

    config_path, overrides = _config_and_overrides(args.items)
    print(C.dump(C.load_config(config_path, overrides)), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mutualkd", description="Online (mutual) knowledge distillation.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--plugin", action="append", default=[], metavar="FILE|MODULE",
                        help="import a file or module of your own terms first (repeatable)")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="train a peer group (no arguments: the quickstart on digits)")
    t.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config, then dotted overrides such as peers.0.arch=resnet18 train.epochs=2")
    t.add_argument("--run-dir", help="where the run is written (default: runs/<time>-<dataset>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", parents=[common],
                       help="re-evaluate a run's checkpoint on its test and validation splits")
    e.add_argument("run_dir")
    e.add_argument("--checkpoint", choices=("best", "last"), default=None,
                   help="default: best when the run has a validation split, else last")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    e.set_defaults(func=_eval)
    x = sub.add_parser("export", parents=[common], help="write one peer as a timm-loadable safetensors file")
    x.add_argument("run_dir")
    x.add_argument("--peer", required=True, help="peer index or name")
    x.add_argument("--checkpoint", choices=("best", "last"), default=None,
                   help="default: best when the run has a validation split, else last")
    x.add_argument("--out", help="output folder (default: RUN_DIR/exports)")
    x.set_defaults(func=_export)
    c = sub.add_parser("config", help="configs: `config show [CONFIG.yaml] [key=value ...]` prints the resolved "
                                      "config with every default")
    c_sub = c.add_subparsers(dest="action", required=True)
    show = c_sub.add_parser("show", parents=[common],
                            help="print the resolved config (base chain, overrides, defaults)")
    show.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    show.set_defaults(func=_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(argv)  # overrides may come after options: train x.yaml --run-dir d a=1
    if extra and (not hasattr(args, "items") or any(e.startswith("-") for e in extra)):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items += extra
    try:
        from mutualkd.registry import load_plugin

        for plugin in args.plugin:
            load_plugin(plugin)
        return args.func(args)
    except UserError as err:
        print(f"mutualkd: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"mutualkd: error: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # a collective failed: another process died, diverged or stalled
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise
        print(f"mutualkd: error: rank {dist.get_rank()}: stopping, a collective with the other processes failed "
              f"({first_line(err)}); the last complete checkpoint stays in the run directory", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mutualkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
