"""Run directories: locating a run's config and checkpoints, and rebuilding its peer group from them."""

from __future__ import annotations

from pathlib import Path

from mutualkd import config as C
from mutualkd.engine import checkpoint
from mutualkd.errors import UserError


def run_config(run_dir: Path, overrides: list[str] = ()) -> C.Config:
    """The resolved config a run directory was started with, plus any overrides."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise UserError(f"{run_dir}: not a mutualkd run directory (no config.yaml)")
    tree = C.read_yaml(path)
    for item in overrides:
        C.apply_override(tree, item)
    return C.validate(tree, source=str(path))


def without_hub_weights(cfg: C.Config) -> C.Config:
    """The same config with `pretrained` off: weights come from the checkpoint, not the hub."""
    cfg = cfg.model_copy(deep=True)
    for p in cfg.peers:
        p.pretrained = False
    return cfg


def checkpoint_path(run_dir: Path, which: str | None) -> Path:
    """checkpoints/<which>.pt; with None, best.pt if the run has one (it needs a validation split), else last.pt."""
    folder = Path(run_dir) / "checkpoints"
    if which is None:
        which = "best" if (folder / "best.pt").is_file() else "last"
    return folder / f"{which}.pt"


def group_from_state(run_dir: Path, which: str | None):
    """(config, checkpoint dict, PeerGroup with the checkpoint's weights, in eval mode on CPU)."""
    from mutualkd.peers import PeerGroup

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    state = checkpoint.load(checkpoint_path(run_dir, which))
    spec = state["data_spec"]
    group = PeerGroup(without_hub_weights(cfg), spec["num_classes"], spec["in_chans"], tuple(spec["image_size"]))
    group.load_state_dict(state["model"])
    return cfg, state, group.eval()
