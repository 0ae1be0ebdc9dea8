"""Micro-benchmark of MCL-OKD's bank scoring: the engine's row-gather kernel vs a dense-GEMM alternative.

`python -m benchmarks.bank_scoring [--threads T] [--K 256 4096 16384] [--N 50000] [--P 4] [--B 64]`

Both compute s[i, j, b, k] = exp(<banks[i, rows[b, k]], v[j, b]> / tau) and its gradient w.r.t. v:
- gather: the engine's `mutualkd.losses.contrastive._BankScores` (gathers B x (K+1) bank rows per bank,
  in chunks, and gathers them again in backward): memory traffic ~ P x B x (K+1) x d floats each way.
- dense (a prototype, here only): v @ banks[i]^T against all N rows ([P, B, N], one GEMM per bank), then
  a gather of the needed scores; backward scatters the score gradients into [P, B, N] and does one GEMM
  per bank. Compute ~ P x N x P x B x d multiply-adds each way, independent of K.
The dense form wins when K+1 is a sizeable fraction of N x P / 100 or so (CIFAR-100, K = 16384) and
loses for small K or huge N (ImageNet's N = 1.28 M); the script checks both agree and times them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


class DenseBankScores(torch.autograd.Function):
    """Prototype: the same function as the engine's `_BankScores`, computed against the whole bank."""

    @staticmethod
    def forward(ctx, v, banks, rows, tau):
        P = v.shape[0]
        idx = rows.unsqueeze(0).expand(P, -1, -1)
        out = v.new_empty(banks.shape[0], P, *rows.shape)
        for i in range(banks.shape[0]):
            out[i] = torch.matmul(v, banks[i].t()).gather(-1, idx).div_(tau).exp_()  # [P, B, N] -> [P, B, K+1]
        ctx.save_for_backward(v, out, rows)
        ctx.banks, ctx.tau = banks, tau
        return out

    @staticmethod
    def backward(ctx, grad):
        v, scores, rows = ctx.saved_tensors
        g = grad * scores / ctx.tau
        P = v.shape[0]
        idx = rows.unsqueeze(0).expand(P, -1, -1)
        grad_v = torch.zeros_like(v)
        dense = v.new_empty(P, v.shape[1], ctx.banks.shape[1])
        for i in range(ctx.banks.shape[0]):
            dense.zero_().scatter_add_(-1, idx, g[i])  # repeated rows add up, as in the gather's backward
            grad_v += torch.matmul(dense, ctx.banks[i])
        return grad_v, None, None, None


def measure(fn, v0, banks, rows, w, tau, reps):
    fwd, bwd = [], []
    for _ in range(reps):
        v = v0.clone().requires_grad_()
        t0 = time.perf_counter()
        s = fn.apply(v, banks, rows, tau)
        t1 = time.perf_counter()
        (s * w).sum().backward()
        t2 = time.perf_counter()
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
    return statistics.median(fwd), statistics.median(bwd), s.detach(), v.grad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bank_scoring")
    ap.add_argument("--K", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--N", type=int, default=50_000)
    ap.add_argument("--P", type=int, default=4)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", help="write the results as JSON")
    a = ap.parse_args(argv)
    from mutualkd.losses.contrastive import _BankScores

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    rows_out = []
    print(f"P={a.P} B={a.B} N={a.N} d={a.d} threads={torch.get_num_threads()} (median of {a.reps})")
    for K in a.K:
        g = torch.Generator().manual_seed(0)
        banks = torch.nn.functional.normalize(torch.randn(a.P, a.N, a.d, generator=g), dim=-1)
        rows = torch.randint(0, a.N, (a.B, K + 1), generator=g)
        v0 = torch.nn.functional.normalize(torch.randn(a.P, a.B, a.d, generator=g), dim=-1)
        w = torch.randn(a.P, a.P, a.B, K + 1, generator=g)
        gf, gb, gs, gg = measure(_BankScores, v0, banks, rows, w, 0.1, a.reps)
        df, db, ds, dg = measure(DenseBankScores, v0, banks, rows, w, 0.1, a.reps)
        err_s = ((gs - ds).abs() / gs.abs()).max().item()
        err_g = ((gg - dg).abs().max() / gg.abs().max()).item()
        rows_out.append({"K": K, "gather_fwd_ms": gf, "gather_bwd_ms": gb, "dense_fwd_ms": df, "dense_bwd_ms": db,
                         "max_rel_diff_scores": err_s, "max_rel_diff_grad": err_g})
        print(f"K={K:6d}  gather fwd {gf:7.1f} bwd {gb:7.1f} ms | dense fwd {df:7.1f} bwd {db:7.1f} ms | "
              f"speed-up x{(gf + gb) / (df + db):.2f} | max rel diff scores {err_s:.1e} grad {err_g:.1e}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"P": a.P, "B": a.B, "N": a.N, "d": a.d, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "results": rows_out}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
