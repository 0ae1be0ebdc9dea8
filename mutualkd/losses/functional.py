"""Pure distillation math: the public functional API of ``LOSS_API.md``.

Every function here is stateless and differentiable, like ``torch.nn.functional``. All math runs in fp32
with autocast switched off (inputs are cast with ``.float()``), nothing synchronises with the host, and every
target side is detached (``sg``) unless the function says otherwise. Peer-stacked quantities are computed with
einsum over the stacked tensors, never with Python loops over peer pairs. Ranks, shapes and option strings are
validated up front and reported as ``ValueError("<function>: <problem>: <shapes>")``.

Notation: ``P`` peers, ``B`` batch, ``C`` classes. "batchmean" sums the non-batch axes and divides by ``B``.
The math behind each function is in METHODS.md (§0.5 primitives, §1.1-1.7, §2.1-2.6).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "kd_kl",
    "kd_per_peer",
    "pairwise_kl",
    "dml_loss",
    "ensemble_kd",
    "attention_map",
    "attention_transfer",
    "fitnet_mse",
    "nst_mmd",
    "nst_bandwidth",
    "fsp_matrix",
    "fsp_loss",
    "relation",
    "sp_loss",
    "rkd_distance",
    "rkd_angle",
    "pkt_loss",
    "cc_repdistiller",
    "cc_rbf_taylor",
    "contrast_masks",
    "supcon_from_logits",
    "supcon",
    "vcl",
    "icl",
    "bank_scores",
    "nce_loss",
    "channel_stats",
    "adain_inject",
    "channel_stats_mse",
]

AFFINITIES = ("dot", "cosine", "euclidean", "gaussian")
NORMALISATIONS = ("none", "row_l2", "mean", "row_l1", "row_softmax")
RELATION_LOSSES = ("mse", "l1", "smooth_l1", "kl")
NST_KERNELS = ("linear", "poly", "gaussian")
_KL_EPS = 1e-7


# ----------------------------------------------------------------------------------------------- helpers


def _fp32(fn: Callable) -> Callable:
    """Run ``fn`` with autocast disabled on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        if not torch.amp.is_autocast_available(device):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _shape(x: Tensor) -> str:
    return str(tuple(x.shape))


def _tensor(name: str, what: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(x).__name__}")


def _rank(name: str, what: str, x: Tensor, ranks: tuple[int, ...], layout: str) -> None:
    """Raise unless ``x.ndim`` is one of ``ranks``; ``layout`` describes the expected shape, e.g. ``[B, C]``."""
    _tensor(name, what, x)
    if x.ndim not in ranks:
        raise ValueError(f"{name}: {what} must be {layout}, got shape {_shape(x)}")


def _same(name: str, what: str, a: Tensor, b: Tensor, dims: slice | int, names=("student", "teacher")) -> None:
    """Raise unless ``a`` and ``b`` agree on ``dims`` (an index or slice of their shapes)."""
    if a.shape[dims] != b.shape[dims]:
        raise ValueError(f"{name}: {what} differ: {names[0]} {_shape(a)} vs {names[1]} {_shape(b)}")


def _choice(name: str, what: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        expected = ", ".join(repr(o) for o in options)
        raise ValueError(f"{name}: unknown {what} {value!r}; expected one of {expected}")


def _positive(name: str, what: str, value) -> None:
    """Reject non-positive Python numbers (tensors are not inspected: that would sync with the host)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name}: {what} must be > 0, got {value!r}")


def _kd(student: Tensor, target: Tensor, T: float, direction: str = "forward") -> Tensor:
    """``T²·batchmean KL(softmax(sg(target)/T) ‖ softmax(student/T))`` over the last two axes ``[B, C]``;
    ``direction="reverse"``: ``KL(softmax(student/T) ‖ softmax(sg(target)/T))``."""
    log_p = F.log_softmax(student.float() / T, dim=-1)
    log_q = F.log_softmax(target.detach().float() / T, dim=-1)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=(-2, -1))
    return kl * (T * T / student.shape[-2])


def _pool_to_common(name: str, f_s: Tensor, f_t: Tensor, names=("student", "teacher")) -> tuple[Tensor, Tensor]:
    """Validate two ``[B, C, H, W]`` maps and adaptive-average-pool the spatially larger one to the smaller."""
    _rank(name, names[0], f_s, (4,), "[B, C, H, W]")
    _rank(name, names[1], f_t, (4,), "[B, C, H, W]")
    _same(name, "batch sizes", f_s, f_t, 0, names)
    (hs, ws), (ht, wt) = f_s.shape[-2:], f_t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return f_s, f_t
    if hs >= ht and ws >= wt:
        return F.adaptive_avg_pool2d(f_s.float(), (ht, wt)), f_t
    if ht >= hs and wt >= ws:
        return f_s, F.adaptive_avg_pool2d(f_t.float(), (hs, ws))
    raise ValueError(
        f"{name}: spatial sizes cannot be pooled to a common H×W (neither map is larger in both): "
        f"{names[0]} {_shape(f_s)} vs {names[1]} {_shape(f_t)}"
    )


def _flatten_pair(name: str, z_s: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a student/teacher pair of ``[B, ...]`` embeddings or maps and flatten both to ``[B, D]`` fp32."""
    for what, z in (("student", z_s), ("teacher", z_t)):
        _tensor(name, what, z)
        if z.ndim < 2:
            raise ValueError(f"{name}: {what} must be [B, D] or a [B, C, H, W] map, got shape {_shape(z)}")
    _same(name, "batch sizes", z_s, z_t, 0)
    return z_s.float().flatten(1), z_t.float().flatten(1)


def _masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """log-softmax of ``logits`` over the entries where ``mask`` is True (last axis).

    A row whose mask is all False is normalised over the whole row instead, so the result (and its gradient)
    stays finite; callers never use such rows.
    """
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return logits - torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1, keepdim=True)


def _sq_dists(z: Tensor) -> Tensor:
    """``[B, B]`` squared Euclidean distances of the rows of ``z``, clamped at 0, diagonal exactly 0."""
    sq = z.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.t())).clamp_min(0.0)
    return d2.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), 0.0)


# ------------------------------------------------------------------------------------------ logit losses


@_fp32
def kd_kl(student: Tensor, teacher: Tensor, T: float = 4.0, direction: str = "forward") -> Tensor:
    """Hinton KD: ``T²·batchmean KL(softmax(sg(teacher)/T) ‖ softmax(student/T))`` for ``[B, C]`` logits;
    ``direction="reverse"`` swaps the KL's arguments (the teacher side stays detached)."""
    name = "kd_kl"
    _rank(name, "student", student, (2,), "[B, C]")
    _rank(name, "teacher", teacher, (2,), "[B, C]")
    _same(name, "shapes", student, teacher, slice(None))
    _positive(name, "T", T)
    _choice(name, "direction", direction, ("forward", "reverse"))
    return _kd(student, teacher, T, direction)


@_fp32
def kd_per_peer(logits: Tensor, targets: Tensor, T: float = 4.0, direction: str = "forward") -> Tensor:
    """``[P]``: ``kd_kl(logits[p], targets[p], T, direction)`` for stacked ``[P, B, C]`` logits and targets
    (``targets`` may be ``[B, C]``, shared by every peer), in one pass."""
    name = "kd_per_peer"
    _rank(name, "logits", logits, (3,), "[P, B, C]")
    _rank(name, "targets", targets, (2, 3), "[B, C] or [P, B, C]")
    _same(name, "[B, C]", logits, targets, slice(-2, None), names=("logits", "targets"))
    if targets.ndim == 3:
        _same(name, "peer counts", logits, targets, 0, names=("logits", "targets"))
    _positive(name, "T", T)
    _choice(name, "direction", direction, ("forward", "reverse"))
    return _kd(logits, targets.expand_as(logits), T, direction)


@_fp32
def pairwise_kl(logits: Tensor, T: float = 1.0) -> Tensor:
    """``[P, P]`` matrix ``M[i, j] = T²·batchmean KL(peer j (detached) ‖ peer i)``, zero diagonal, one einsum."""
    name = "pairwise_kl"
    _rank(name, "logits", logits, (3,), "[P, B, C]")
    _positive(name, "T", T)
    P, B = logits.shape[:2]
    z = logits.float() / T
    log_p = F.log_softmax(z, dim=-1)  # Lg, carries the gradient of peer i
    log_q = F.log_softmax(z.detach(), dim=-1)
    q = log_q.exp()  # Q, the detached targets
    negent = torch.einsum("jbc,jbc->j", q, log_q)
    cross = torch.einsum("ibc,jbc->ij", log_p, q)
    m = (negent[None, :] - cross) * (T * T / B)
    return m.masked_fill(torch.eye(P, dtype=torch.bool, device=m.device), 0.0)


@_fp32
def dml_loss(logits: Tensor, T: float = 1.0, reduction: str = "mean") -> Tensor:
    """DML per-peer loss ``[P]``: row sums of :func:`pairwise_kl`, divided by ``P−1`` for ``"mean"``."""
    name = "dml_loss"
    _choice(name, "reduction", reduction, ("mean", "sum"))
    _rank(name, "logits", logits, (3,), "[P, B, C]")
    if reduction == "mean" and logits.shape[0] < 2:
        raise ValueError(f"{name}: reduction 'mean' needs at least 2 peers, got logits {_shape(logits)}")
    rows = pairwise_kl(logits, T).sum(dim=1)
    return rows / (logits.shape[0] - 1) if reduction == "mean" else rows


@_fp32
def ensemble_kd(logits: Tensor, T: float = 3.0, weights: Tensor | None = None) -> Tensor:
    """Per-peer ``[P]`` KD toward the detached ensemble ``Σ_p w_p·logits[p]``; ``w`` uniform, ``[P]`` or ``[B, P]``."""
    name = "ensemble_kd"
    _rank(name, "logits", logits, (3,), "[P, B, C]")
    _positive(name, "T", T)
    P, B = logits.shape[:2]
    z = logits.float()
    if weights is None:
        ensemble = z.detach().mean(dim=0)
    else:
        _tensor(name, "weights", weights)
        w = weights.detach().float()
        if w.shape == (P,):
            ensemble = torch.einsum("p,pbc->bc", w, z.detach())
        elif w.shape == (B, P):
            ensemble = torch.einsum("bp,pbc->bc", w, z.detach())
        else:
            raise ValueError(
                f"{name}: weights must be [P] or [B, P] = ({P},) or ({B}, {P}), "
                f"got weights {_shape(weights)} for logits {_shape(logits)}"
            )
    return _kd(z, ensemble[None], T)


# ---------------------------------------------------------------------------------------- feature losses


@_fp32
def attention_map(f: Tensor, p: float = 2) -> Tensor:
    """AT attention ``[B, H·W]``: ``normalize(flatten(mean_c f^p))``, L2 over ``H·W`` per sample."""
    _rank("attention_map", "f", f, (4,), "[B, C, H, W]")
    return F.normalize(f.float().pow(p).mean(dim=1).flatten(1), dim=1)


@_fp32
def attention_transfer(f_s: Tensor, f_t: Tensor, p: float = 2, paper_norm: bool = False) -> Tensor:
    """AT loss: ``mean_{b,hw}(attention_map(f_s) − attention_map(sg f_t))²``, larger map pooled first;
    ``paper_norm``: the paper's unsquared ``½·mean_b ‖attention_map(f_s) − attention_map(sg f_t)‖₂``
    (METHODS §2.3 [reconstructed])."""
    f_s, f_t = _pool_to_common("attention_transfer", f_s, f_t)
    diff = attention_map(f_s, p) - attention_map(f_t.detach(), p)
    if paper_norm:
        return 0.5 * torch.linalg.vector_norm(diff, dim=1).mean()  # the norm's gradient at 0 is 0, not NaN
    return diff.pow(2).mean()


@_fp32
def fitnet_mse(f_s: Tensor, f_t: Tensor) -> Tensor:
    """FitNets hint loss: ``mean((f_s − sg f_t)²)`` over all elements; shapes must match."""
    name = "fitnet_mse"
    _tensor(name, "student", f_s)
    _tensor(name, "teacher", f_t)
    _same(name, "shapes", f_s, f_t, slice(None))
    return (f_s.float() - f_t.detach().float()).pow(2).mean()


@_fp32
def nst_mmd(
    f_s: Tensor,
    f_t: Tensor,
    kernel: str = "poly",
    degree: int = 2,
    c: float = 0.0,
    sigma2: float | Tensor | None = None,
) -> Tensor:
    """NST: batch mean of ``MMD²`` between the L2-normalised channel rows of student and (detached) teacher maps."""
    name = "nst_mmd"
    _choice(name, "kernel", kernel, NST_KERNELS)
    if kernel == "gaussian":
        if sigma2 is None:
            raise ValueError(f"{name}: kernel 'gaussian' requires sigma2 (the bandwidth σ²); none was given")
        _positive(name, "sigma2", sigma2)
    f_s, f_t = _pool_to_common(name, f_s, f_t)
    if isinstance(sigma2, Tensor):
        if sigma2.shape not in ((), (1,), (f_s.shape[0],)):
            raise ValueError(f"{name}: sigma2 must be a number, [] or [B], got {_shape(sigma2)} for B={f_s.shape[0]}")
        sigma2 = sigma2.detach().float().reshape(-1, 1, 1)
    s = F.normalize(f_s.float().flatten(2), dim=2)  # [B, C_s, HW]
    t = F.normalize(f_t.detach().float().flatten(2), dim=2)  # [B, C_t, HW]
    c_s, c_t, hw = s.shape[1], t.shape[1], s.shape[2]

    def mean_gap() -> Tensor:  # ‖mean_i t_i − mean_j s_j‖² = linear-kernel MMD²
        return (t.mean(dim=1) - s.mean(dim=1)).pow(2).sum(dim=1)

    if kernel == "linear":
        mmd = mean_gap()
    elif kernel == "poly" and degree == 2 and hw < min(c_s, c_t):
        # (x·y + c)² = (x·y)² + 2c·x·y + c²; the (x·y)² part is Gram matching in the smaller HW×HW orientation:
        # mean (TTᵀ)² + mean (SSᵀ)² − 2·mean (TSᵀ)² = ‖TᵀT/C_t − SᵀS/C_s‖_F², the linear part is 2c·mean_gap.
        gram_t = torch.einsum("bci,bcj->bij", t, t) / c_t
        gram_s = torch.einsum("bci,bcj->bij", s, s) / c_s
        mmd = (gram_t - gram_s).pow(2).sum(dim=(1, 2)) + 2.0 * c * mean_gap()
    else:

        def k(a: Tensor, b: Tensor) -> Tensor:
            dot = torch.einsum("bid,bjd->bij", a, b)
            if kernel == "poly":
                return (dot + c).pow(degree)
            na, nb = a.pow(2).sum(dim=2), b.pow(2).sum(dim=2)
            d2 = (na[:, :, None] + nb[:, None, :] - 2.0 * dot).clamp_min(0.0)
            return torch.exp(-d2 / (2.0 * sigma2))

        mmd = k(t, t).mean(dim=(1, 2)) + k(s, s).mean(dim=(1, 2)) - 2.0 * k(s, t).mean(dim=(1, 2))
    return mmd.mean()


@_fp32
def nst_bandwidth(f_s: Tensor, f_t: Tensor) -> Tensor:
    """NST's default Gaussian bandwidth ``σ²`` per sample ``[B]``, detached (METHODS §2.5 [reconstructed]): the
    mean squared distance over distinct pairs of the joint set of L2-normalised channel rows of both maps (the
    rows :func:`nst_mmd` compares; the larger map is pooled first). Pass it as ``nst_mmd(..., sigma2=...)``."""
    f_s, f_t = _pool_to_common("nst_bandwidth", f_s, f_t)
    x = torch.cat([F.normalize(f.detach().float().flatten(2), dim=2) for f in (f_s, f_t)], dim=1)  # [B, n, HW]
    n = x.shape[1]
    # Σ_{i,j} ‖x_i − x_j‖² = 2n·Σ_i ‖x_i‖² − 2‖Σ_i x_i‖²; the diagonal adds 0, so the mean divides by n(n − 1)
    total = 2.0 * n * x.pow(2).sum(dim=(1, 2)) - 2.0 * x.sum(dim=1).pow(2).sum(dim=1)
    return (total / (n * (n - 1))).clamp_min(1e-12)  # all-zero rows: any positive σ² gives k = 1


def _fsp(name: str, f1: Tensor, f2: Tensor, names: tuple[str, str]) -> Tensor:
    f1, f2 = _pool_to_common(name, f1, f2, names)
    a, b = f1.float().flatten(2), f2.float().flatten(2)
    return torch.einsum("bis,bjs->bij", a, b) / a.shape[2]


@_fp32
def fsp_matrix(f1: Tensor, f2: Tensor) -> Tensor:
    """FSP ("flow") matrix ``[B, C1, C2]``: ``G = (1/(H·W))·Σ_s f1[:, :, s] f2[:, :, s]ᵀ`` of two maps of one
    network; the spatially larger map is adaptive-average-pooled to the smaller one first."""
    return _fsp("fsp_matrix", f1, f2, ("f1", "f2"))


@_fp32
def fsp_loss(s1: Tensor, s2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    """FSP loss of one pair of maps: ``mean_{b,c1,c2}(fsp_matrix(s1, s2) − fsp_matrix(sg t1, sg t2))²``. The
    student's C1, C2 must equal the teacher's; H×W may differ between student and teacher."""
    name = "fsp_loss"
    for what, f in (("student f1", s1), ("student f2", s2), ("teacher f1", t1), ("teacher f2", t2)):
        _rank(name, what, f, (4,), "[B, C, H, W]")
    if (s1.shape[:2], s2.shape[:2]) != (t1.shape[:2], t2.shape[:2]):
        raise ValueError(f"{name}: batch sizes or channels differ: student {_shape(s1)}, {_shape(s2)} vs teacher "
                         f"{_shape(t1)}, {_shape(t2)}")
    g_s = _fsp(name, s1, s2, ("student f1", "student f2"))
    g_t = _fsp(name, t1.detach(), t2.detach(), ("teacher f1", "teacher f2"))
    return (g_s - g_t).pow(2).mean()


# --------------------------------------------------------------------------------------- relation losses


def _affinity(z: Tensor, affinity: str, gamma: float) -> Tensor:
    if affinity == "dot":
        return z @ z.t()
    if affinity == "cosine":
        zn = F.normalize(z, dim=1)
        return zn @ zn.t()
    d2 = _sq_dists(z)
    if affinity == "gaussian":
        return torch.exp(-gamma * d2)
    # euclidean: clamp before sqrt keeps the gradient finite; the diagonal is then reset to exactly 0
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return d2.clamp_min(1e-12).sqrt().masked_fill(eye, 0.0)


def _normalise(a: Tensor, normalisation: str, tau: float) -> Tensor:
    if normalisation == "none":
        return a
    if normalisation == "row_l2":
        return F.normalize(a, dim=1)
    if normalisation == "mean":
        n = a.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=a.device)
        return a / (a.masked_fill(eye, 0.0).sum() / (n * (n - 1)))  # no boolean indexing: no host sync
    if normalisation == "row_l1":
        a = (a + 1.0) / 2.0
        return a / a.sum(dim=1, keepdim=True)
    return F.softmax(a / tau, dim=1)  # row_softmax


def _relation_loss(n_s: Tensor, n_t: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return (n_s - n_t).pow(2).mean()
    if loss == "l1":
        return (n_s - n_t).abs().mean()
    if loss == "smooth_l1":
        return F.smooth_l1_loss(n_s, n_t)
    return (n_t * torch.log((n_t + _KL_EPS) / (n_s + _KL_EPS))).mean()  # kl


def _relation(name, z_s, z_t, affinity, normalisation, loss, tau=1.0, gamma=1.0) -> Tensor:
    _choice(name, "affinity", affinity, AFFINITIES)
    _choice(name, "normalisation", normalisation, NORMALISATIONS)
    _choice(name, "loss", loss, RELATION_LOSSES)
    z_s, z_t = _flatten_pair(name, z_s, z_t)
    if normalisation == "mean" and z_s.shape[0] < 2:
        raise ValueError(f"{name}: normalisation 'mean' needs a batch of at least 2, got {_shape(z_s)}")
    if normalisation == "row_softmax":
        _positive(name, "tau", tau)
    n_s = _normalise(_affinity(z_s, affinity, gamma), normalisation, tau)
    n_t = _normalise(_affinity(z_t.detach(), affinity, gamma), normalisation, tau)
    return _relation_loss(n_s, n_t, loss)


@_fp32
def relation(
    z_s: Tensor,
    z_t: Tensor,
    affinity: str,
    normalisation: str,
    loss: str,
    tau: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    """Affinity × normalisation × loss relation KD: ``loss(N(A(z_s)), N(A(sg z_t)))`` on ``B×B`` matrices."""
    return _relation("relation", z_s, z_t, affinity, normalisation, loss, tau, gamma)


@_fp32
def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """Similarity-preserving KD: ``relation(flatten f_s, flatten f_t, "dot", "row_l2", "mse")``."""
    return _relation("sp_loss", f_s, f_t, "dot", "row_l2", "mse")


@_fp32
def rkd_distance(z_s: Tensor, z_t: Tensor) -> Tensor:
    """RKD distance: ``relation(z_s, z_t, "euclidean", "mean", "smooth_l1")``."""
    return _relation("rkd_distance", z_s, z_t, "euclidean", "mean", "smooth_l1")


@_fp32
def rkd_angle(z_s: Tensor, z_t: Tensor) -> Tensor:
    """RKD angle: smooth-L1 between the ``B³`` triplet cosines ``⟨e_ji, e_jk⟩`` of student and detached teacher."""
    z_s, z_t = _flatten_pair("rkd_angle", z_s, z_t)

    def angles(z: Tensor) -> Tensor:
        e = F.normalize(z[None, :, :] - z[:, None, :], dim=2)  # e[j, i] = normalize(z_i − z_j)
        return torch.einsum("jid,jkd->ijk", e, e)

    return F.smooth_l1_loss(angles(z_s), angles(z_t.detach()))


@_fp32
def pkt_loss(z_s: Tensor, z_t: Tensor) -> Tensor:
    """Probabilistic knowledge transfer: ``relation(z_s, z_t, "cosine", "row_l1", "kl")``."""
    return _relation("pkt_loss", z_s, z_t, "cosine", "row_l1", "kl")


@_fp32
def cc_repdistiller(e_s: Tensor, e_t: Tensor) -> Tensor:
    """Correlation congruence, RepDistiller's form: ``mean_b Σ_c |Δ_b,c|·|Δ_b+1,c|`` over the ``B−1``
    consecutive sample pairs, ``Δ = e_s − e_t`` for ``[B, d]`` embeddings. ``e_t`` is NOT detached: there it is
    the output of a trainable teacher-side embedding of the detached teacher feature (METHODS §2.6); detach it
    yourself for a fixed target."""
    name = "cc_repdistiller"
    _rank(name, "student", e_s, (2,), "[B, d]")
    _rank(name, "teacher", e_t, (2,), "[B, d]")
    _same(name, "shapes", e_s, e_t, slice(None))
    if e_s.shape[0] < 2:
        raise ValueError(f"{name}: needs a batch of at least 2, got {_shape(e_s)}")
    delta = (e_s.float() - e_t.float()).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def _rbf_taylor(z: Tensor, gamma: float, order: int) -> Tensor:
    """``Σ_{r=0..order} e^{−2γ}(2γ)^r/r!·cos^r``, ``cos = ẑẑᵀ``: the Taylor series of ``exp(−γ‖ẑ_i − ẑ_j‖²)``."""
    zn = F.normalize(z, dim=1)
    cos = zn @ zn.t()
    return sum(math.exp(-2.0 * gamma) * (2.0 * gamma) ** r / math.factorial(r) * cos.pow(r) for r in range(order + 1))


@_fp32
def cc_rbf_taylor(z_s: Tensor, z_t: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """Correlation congruence, Knowledge-Distillation-Zoo's form: ``mean over B² of (K(z_s) − K(sg z_t))²`` with
    ``K`` the order-``order`` Taylor expansion of the Gaussian RBF on L2-normalised rows,
    ``K_ij = Σ_{r=0..order} e^{−2γ}(2γ)^r/r!·(ẑ_i·ẑ_j)^r``; widths may differ."""
    name = "cc_rbf_taylor"
    _positive(name, "gamma", gamma)
    if not isinstance(order, int) or order < 0:
        raise ValueError(f"{name}: order must be an int >= 0, got {order!r}")
    z_s, z_t = _flatten_pair(name, z_s, z_t)
    return (_rbf_taylor(z_s, gamma, order) - _rbf_taylor(z_t.detach(), gamma, order)).pow(2).mean()


# ------------------------------------------------------------------------------------ contrastive losses


def contrast_masks(labels: Tensor, self_positive: bool = False) -> tuple[Tensor, Tensor]:
    """Bool ``[B, B]`` (positive, denominator) masks: same label / all, ``w = u`` dropped unless ``self_positive``."""
    _rank("contrast_masks", "labels", labels, (1,), "[B]")
    same = labels[:, None] == labels[None, :]
    if self_positive:
        return same, torch.ones_like(same)
    not_self = ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & not_self, not_self


@_fp32
def supcon_from_logits(logits: Tensor, pos_mask: Tensor, den_mask: Tensor) -> Tensor:
    """SupCon on ``[..., B, B]`` scaled similarities with bool ``[B, B]`` masks; returns ``[...]``."""
    name = "supcon_from_logits"
    _tensor(name, "logits", logits)
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"{name}: logits must be [..., B, B], got shape {_shape(logits)}")
    B = logits.shape[-1]
    for what, m in (("pos_mask", pos_mask), ("den_mask", den_mask)):
        _tensor(name, what, m)
        if m.dtype != torch.bool or m.shape != (B, B):
            raise ValueError(
                f"{name}: {what} must be a bool [B, B] = ({B}, {B}) mask, "
                f"got {m.dtype} {_shape(m)} for logits {_shape(logits)}"
            )
    log_prob = _masked_log_softmax(logits.float(), den_mask)
    n_pos = pos_mask.sum(dim=-1)  # [B]
    per_anchor = torch.where(pos_mask, log_prob, 0.0).sum(dim=-1) / n_pos.clamp_min(1)
    has_pos = n_pos > 0
    return -(per_anchor * has_pos).sum(dim=-1) / has_pos.sum().clamp_min(1)


def _supcon(name, anchor, contrast, labels, tau, self_positive) -> Tensor:
    _rank(name, "anchor", anchor, (2,), "[B, d]")
    _rank(name, "contrast", contrast, (2,), "[B, d]")
    _same(name, "shapes", anchor, contrast, slice(None), names=("anchor", "contrast"))
    _rank(name, "labels", labels, (1,), "[B]")
    if labels.shape[0] != anchor.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: anchor {_shape(anchor)} vs labels {_shape(labels)}")
    _positive(name, "tau", tau)
    logits = anchor.float() @ contrast.float().t() / tau
    return supcon_from_logits(logits, *contrast_masks(labels, self_positive))


@_fp32
def supcon(anchor: Tensor, contrast: Tensor, labels: Tensor, tau: float = 0.1, self_positive: bool = False) -> Tensor:
    """Supervised contrastive loss of ``anchor`` rows against ``contrast`` rows (``S = anchor·contrastᵀ/tau``)."""
    return _supcon("supcon", anchor, contrast, labels, tau, self_positive)


@_fp32
def vcl(v: Tensor, labels: Tensor, tau: float = 0.1) -> Tensor:
    """MCL vanilla (within-network) contrastive loss: ``supcon(v, v, labels, tau)``."""
    return _supcon("vcl", v, v, labels, tau, False)


@_fp32
def icl(v_a: Tensor, v_b: Tensor, labels: Tensor, tau: float = 0.1, self_positive: bool = False) -> Tensor:
    """MCL interactive (cross-network) contrastive loss: ``supcon(v_a, v_b, ...)``; gradient flows into both."""
    return _supcon("icl", v_a, v_b, labels, tau, self_positive)


@_fp32
def bank_scores(bank_rows: Tensor, embeddings: Tensor, tau: float) -> Tensor:
    """MCL-OKD scores ``[P_i, P_j, B, K+1]``: ``exp(⟨sg bank_rows[i, b, k], embeddings[j, b]⟩ / tau)``."""
    name = "bank_scores"
    _rank(name, "bank_rows", bank_rows, (4,), "[P, B, K+1, d]")
    _rank(name, "embeddings", embeddings, (3,), "[P, B, d]")
    if bank_rows.shape[1] != embeddings.shape[1] or bank_rows.shape[3] != embeddings.shape[2]:
        raise ValueError(
            f"{name}: batch size or width differ: bank_rows {_shape(bank_rows)} vs embeddings {_shape(embeddings)}"
        )
    _positive(name, "tau", tau)
    return torch.exp(torch.einsum("ibkd,jbd->ijbk", bank_rows.detach().float(), embeddings.float()) / tau)


@_fp32
def nce_loss(scores: Tensor, n_data: int, eps: float = 1e-7, mean_score: Tensor | None = None) -> Tensor:
    """CRD-form NCE on ``[..., B, K+1]`` scores (positive first), ``Z = sg(mean s)·n_data``; returns ``[...]``.

    ``mean_score`` (``[...]``) replaces the per-call mean in Z, e.g. by its mean over data-parallel ranks.
    """
    name = "nce_loss"
    _tensor(name, "scores", scores)
    if scores.ndim < 2 or scores.shape[-1] < 2:
        raise ValueError(f"{name}: scores must be [..., B, K+1] with K >= 1, got shape {_shape(scores)}")
    _positive(name, "n_data", n_data)
    s = scores.float()
    B, K = s.shape[-2], s.shape[-1] - 1
    k_pi = K / n_data
    mean = s.detach().mean(dim=(-2, -1)) if mean_score is None else mean_score.detach().float()
    p = s / (mean[..., None, None] * n_data)
    log_pos = torch.log(p[..., 0] / (p[..., 0] + k_pi + eps))
    log_neg = torch.log(k_pi / (p[..., 1:] + k_pi + eps))
    return -(log_pos.sum(dim=-1) + log_neg.sum(dim=(-2, -1))) / B


# ---------------------------------------------------------------------- AdaIN statistics (METHODS §2.7)


@_fp32
def channel_stats(f: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel ``(μ, σ)`` of a ``[B, C, H, W]`` map over ``H×W``, each ``[B, C]``:
    ``σ = sqrt(var + eps)`` with the population variance (instance-norm convention, defined for 1×1 maps)."""
    name = "channel_stats"
    _rank(name, "f", f, (4,), "[B, C, H, W]")
    _positive(name, "eps", eps)
    var, mu = torch.var_mean(f.float().flatten(2), dim=2, correction=0)
    return mu, (var + eps).sqrt()


@_fp32
def adain_inject(f_s: Tensor, f_t: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN of the student's statistics into the detached teacher map: ``σ_s·(sg f_t − μ_t)/σ_t + μ_s``
    (``[B, C, H_t, W_t]``; gradient flows only through ``μ_s``, ``σ_s`` of ``f_s``). ``B`` and ``C`` must match.

    Evaluated as ``f_t + (f_t − μ_t)·(σ_s/σ_t − 1) + (μ_s − μ_t)``, the same value, which is ``f_t`` bit for bit
    when the statistics are equal: the injection is exactly the identity on a student that already matches."""
    name = "adain_inject"
    _rank(name, "teacher", f_t, (4,), "[B, C, H, W]")
    _rank(name, "student", f_s, (4,), "[B, C, H, W]")
    _same(name, "batch sizes or channels", f_s, f_t, slice(0, 2))
    t = f_t.detach().float()
    mu_t, sigma_t = channel_stats(t, eps)
    mu_s, sigma_s = channel_stats(f_s, eps)
    scale = (sigma_s / sigma_t - 1.0)[..., None, None]
    return t + (t - mu_t[..., None, None]) * scale + (mu_s - mu_t)[..., None, None]


@_fp32
def channel_stats_mse(f_s: Tensor, f_t: Tensor, eps: float = 1e-5) -> Tensor:
    """AdaIN's ablation baseline: ``mean_{b,c}(μ_s − μ_t)² + mean_{b,c}(σ_s − σ_t)²``, teacher detached;
    ``B`` and ``C`` must match."""
    name = "channel_stats_mse"
    _rank(name, "student", f_s, (4,), "[B, C, H, W]")
    _rank(name, "teacher", f_t, (4,), "[B, C, H, W]")
    _same(name, "batch sizes or channels", f_s, f_t, slice(0, 2))
    mu_s, sigma_s = channel_stats(f_s, eps)
    mu_t, sigma_t = channel_stats(f_t.detach(), eps)
    return (mu_s - mu_t).pow(2).mean() + (sigma_s - sigma_t).pow(2).mean()
