"""Export one trained peer as a plain timm checkpoint: safetensors weights plus its pretrained_cfg.

The file loads with `timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=cfg)` where `cfg`
is the JSON's `pretrained_cfg`: no mutualkd import for timm's own architectures, and only
`import mutualkd.models` (which registers the zoo) for the CIFAR zoo. Projection heads and loss
auxiliaries are not part of the export.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save as save_safetensors

from mutualkd.engine import checkpoint
from mutualkd.errors import UserError
from mutualkd.runs import checkpoint_path, group_from_state


def export_peer(run_dir: Path, peer: str, which: str | None = None, out_dir: Path | None = None) -> Path:
    """Write `<out_dir>/<peer name>.safetensors` and `.json`; `peer` is an index or a peer name."""
    cfg, state, group = group_from_state(run_dir, which)
    names = cfg.peer_names
    k = int(peer) if peer.isdigit() else (names.index(peer) if peer in names else -1)
    if not 0 <= k < len(names):
        raise UserError(f"--peer: {peer!r} is not a peer of this run; peers: "
                        + ", ".join(f"{i} ({n})" for i, n in enumerate(names)))
    model, spec = group.peer_model(k), state["data_spec"]
    out_dir = Path(out_dir or run_dir / "exports")
    weights = out_dir / f"{names[k]}.safetensors"
    pretrained_cfg = {
        "file": str(weights.resolve()), "num_classes": spec["num_classes"],
        "input_size": [spec["in_chans"], *spec["image_size"]], "mean": list(spec["mean"]),
        "std": list(spec["std"]), "crop_pct": 1.0, "interpolation": "bilinear",
        "first_conv": model.pretrained_cfg.get("first_conv"), "classifier": model.pretrained_cfg.get("classifier"),
    }
    arch = group.archs[k]
    tensors = {n: t.detach().contiguous().clone() for n, t in model.state_dict().items()}
    meta = {"arch": arch, "peer": names[k], "pretrained_cfg": json.dumps(pretrained_cfg)}
    checkpoint.atomic_write(weights, lambda f: f.write(save_safetensors(tensors, metadata=meta)))
    kwargs = cfg.peers[group.index[k]].model_kwargs
    extra = "".join(f", {n}={v!r}" for n, v in kwargs.items())
    usage = (f"timm.create_model({arch!r}, pretrained=True, pretrained_cfg_overlay=cfg{extra})"
             + ("  # after `import mutualkd.models`" if type(model).__module__.startswith("mutualkd.") else ""))
    info = {"arch": arch, "peer": names[k], "source": str(checkpoint_path(run_dir, which)),
            "pretrained_cfg": pretrained_cfg, "model_kwargs": kwargs, "usage": usage}
    text = json.dumps(info, indent=2).encode() + b"\n"
    checkpoint.atomic_write(weights.with_suffix(".json"), lambda f: f.write(text))
    return weights
