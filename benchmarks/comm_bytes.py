"""Bytes exchanged per training step by data-parallel vs peer-parallel placement, computed and measured.

Computed from the code: the payloads the step moves between 2 processes.
- data_parallel: DDP all-reduces every gradient (fp32) and broadcasts the module buffers (BatchNorm
  statistics) from rank 0 before each forward; MCL all-gathers embeddings and labels over the global batch.
- peer_parallel: one all-gather of [P_local, B, C (+ d)] fp32 (logits, embeddings) forward, and its
  backward all-to-all of the same size.
On the wire with 2 ranks, an all-reduce of S bytes moves 2S (each rank sends half, then the reduced half),
a broadcast S, an all-gather of a total S moves S, the backward all-to-all S.

Measured: loopback bytes (/proc/net/dev, `lo`) of two `mutualkd train` runs of N1 and N2 steps over
2 gloo processes, differenced so start-up, rendezvous and checkpoint traffic cancel:
(bytes(N2) - bytes(N1)) / (N2 - N1), neither run reaching an epoch end. Logging reductions are kept out
by a long log interval.

    python -m benchmarks.comm_bytes [--out benchmarks/comm_bytes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import timm

import mutualkd.models  # noqa: F401

SCENARIOS = {
    # name: (peers, num_classes, image size, global batch, objective terms, embedding dim or None)
    "4x cifar_resnet32, DML+MCL": (["cifar_resnet32"] * 4, 100, 32, 64,
                                   "[{name: ce}, {name: dml}, {name: mcl}]", 128),
    "2x resnet50, DML": (["resnet50"] * 2, 1000, 32, 64, "[{name: ce}, {name: dml}]", None),
}
WORLD = 2


def computed(peers, classes, batch, emb_dim) -> dict:
    """Per-step wire bytes with 2 ranks, from the models' parameter and buffer sizes and the exchanged shapes."""
    models = [timm.create_model(a, num_classes=classes) for a in peers]
    grads = sum(p.numel() * 4 for m in models for p in m.parameters())
    head_params = 0
    if emb_dim:  # mlp heads: Linear(D, D) + Linear(D, d), one per peer
        head_params = sum((m.num_features + 1) * m.num_features + (m.num_features + 1) * emb_dim for m in models)
    grads += head_params * 4
    buffers = sum(b.numel() * b.element_size() for m in models for b in m.buffers())
    gathered = (len(peers) * batch * emb_dim * 4 + batch * 8) if emb_dim else 0  # embeddings + labels
    dp = 2 * grads + buffers + gathered
    exchanged = len(peers) * batch * (classes + (emb_dim or 0)) * 4
    pp = 2 * exchanged
    return {"data_parallel": dp, "peer_parallel": pp,
            "parts": {"grad_allreduce_payload": grads, "buffer_broadcast": buffers,
                      "batch_gather": gathered, "peer_exchange_payload": exchanged}}


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, data = line.partition(":")
        if name.strip() == "lo":
            return int(data.split()[0])  # received on lo == sent on lo
    raise RuntimeError("no loopback interface in /proc/net/dev")


def measure(peers, classes, size, batch, terms, emb_dim, placement: str, steps: int, max_steps: int) -> int:
    """Loopback bytes of a whole 2-process run of `steps` steps; the training set is sized so that no run
    reaches an epoch end (whose evaluation and checkpoint would not cancel in the difference)."""
    train_size = max(batch * (max_steps + 1), 2 * classes)
    overrides = ["data.name=synthetic", f"data.synthetic.num_classes={classes}", f"data.synthetic.image_size={size}",
                 f"data.synthetic.train_size={train_size}", "data.val_split=0",
                 f"data.batch_size={batch // WORLD if placement == 'data_parallel' else batch}",
                 f"objective.terms={terms}", f"placement={placement}", f"train.max_steps={steps}",
                 "train.log_every=100000", "train.progress=false", "tracking=none"]
    overrides += ["peers=[" + ", ".join(f"{{arch: {a}}}" for a in peers) + "]"]
    if emb_dim:
        overrides += ["embedding.head=mlp", f"embedding.dim={emb_dim}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        before = loopback_bytes()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                        "-m", "mutualkd", "train", *overrides, "--run-dir", f"{tmp}/run"],
                       env=env, check=True, capture_output=True, text=True)
        return loopback_bytes() - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs=2, default=(2, 12), metavar=("N1", "N2"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n1, n2 = args.steps
    results = {}
    for name, (peers, classes, size, batch, terms, emb) in SCENARIOS.items():
        row = {"computed": computed(peers, classes, batch, emb), "measured": {}}
        for placement in ("data_parallel", "peer_parallel"):
            b1 = measure(peers, classes, size, batch, terms, emb, placement, n1, n2)
            b2 = measure(peers, classes, size, batch, terms, emb, placement, n2, n2)
            row["measured"][placement] = (b2 - b1) / (n2 - n1)
        results[name] = row
    print(f"{'scenario':<28}{'placement':<15}{'computed MB/step':>18}{'measured MB/step':>18}{'ratio':>8}")
    for name, row in results.items():
        for placement in ("data_parallel", "peer_parallel"):
            c, m = row["computed"][placement], row["measured"][placement]
            print(f"{name:<28}{placement:<15}{c / 1e6:>18.3f}{m / 1e6:>18.3f}{m / c:>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"world_size": WORLD, "global_batch_note": "per scenario",
                                              "steps": [n1, n2], "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
