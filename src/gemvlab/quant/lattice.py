"""Lattice primitives of GLVQ (Zhang et al. 2025, "Learning Grouped Lattice Vector Quantizers for
Low-Bit LLM Compression", arXiv 2510.20984).

A group's codebook is the lattice {G z : z integer} of a d x d generation matrix G (d = 8 or 32).
Weight vectors x [..., d] are encoded as integer codes z [..., d], each coordinate restricted to
2**bits levels, and decoded by one matrix-vector product G z.

From the paper (abstract): one learnable G per group, Babai rounding to approximate the nearest
lattice point, decoding as a matrix-vector product. From the project's summary of the paper, not
yet checked against its full text: mu-law companding per group with mu clipped to [10, 255],
Cholesky initialisation of G, greedy coordinate descent as the ablation alternative to Babai.
Ours: the code range and the moment matrix and scale in cholesky_init (documented where they
are defined). Bit accounting is LatticeQuant.bits_per_weight in glvq.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

MU_MIN, MU_MAX = 10.0, 255.0


def _common(x: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """x and G in one floating dtype, so a solve or product never mixes precisions."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, G.dtype), torch.float32)
    return x.to(dtype), G.to(dtype)


def code_range(bits: int) -> tuple[int, int]:
    """The 2**bits integer levels {-2**(bits-1) .. 2**(bits-1) - 1}, as for signed integers."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _bounds(bits: int | Tensor, like: Tensor) -> tuple[Tensor | int, Tensor | int]:
    """code_range for one width, or per leading index for a tensor of widths [...] (shaped
    [..., 1, 1] to broadcast over the vectors and coordinates of a batch)."""
    if isinstance(bits, int):
        return code_range(bits)
    if int(bits.min()) < 1:
        raise ValueError(f"bits must be >= 1, got {bits.tolist()}")
    hi = (2 ** (bits.to(like.device, torch.int64) - 1))[..., None, None]
    return -hi, hi - 1


def clamp_codes(z: Tensor, bits: int | Tensor) -> Tensor:
    """Codes restricted to the 2**bits levels, so each coordinate costs exactly `bits` bits;
    bits may be a tensor of widths, one per leading index of a batch z [..., V, d]."""
    lo, hi = _bounds(bits, z)
    if isinstance(lo, int):
        return z.clamp(lo, hi)
    return torch.maximum(torch.minimum(z, hi), lo)


def lattice_point(z: Tensor, G: Tensor) -> Tensor:
    """Decode: the lattice point G z for every code vector z [..., d] (one matvec per vector)."""
    return z.to(G.dtype) @ G.mT


def babai_round(x: Tensor, G: Tensor) -> Tensor:
    """Babai rounding z = round(G^-1 x) [..., d] int64: exact nearest point only for orthogonal G.

    G^-1 x comes from one LU solve over all vectors rather than an explicit inverse, which loses
    accuracy when G is ill-conditioned. Codes are not clamped (see clamp_codes).
    """
    x, G = _common(x, G)
    d = G.shape[-1]
    coords = torch.linalg.solve(G, x.reshape(-1, d).mT).mT
    return torch.round(coords).to(torch.int64).reshape(x.shape)


def greedy_coordinate_descent(x: Tensor, G: Tensor, z0: Tensor, bits: int | Tensor,
                              sweeps: int = 2) -> Tensor:
    """Codes improved from z0 by trying z_i +- 1 per coordinate, kept only if ||x - G z||^2 drops.

    z0 is first clamped to the code range; from there every accepted move strictly lowers the
    error, so the result is never worse than clamp_codes(z0, bits). Moving z_i by s changes the
    error by ||g_i||^2 - 2 s <r, g_i> (r the residual, g_i column i of G), so only the sign of
    <r, g_i> can help and the residual is updated in place instead of recomputed. A sweep that
    moves nothing ends the search, since every later sweep would repeat it. Batched:
    x, z0 [..., V, d] with G [..., d, d] and bits an int or a tensor [...] of widths.
    """
    x, G = _common(x, G)
    lo, hi = _bounds(bits, z0)
    if not isinstance(lo, int):
        lo, hi = lo[..., 0].to(x.dtype), hi[..., 0].to(x.dtype)  # [..., 1]
    z = clamp_codes(z0, bits).to(x.dtype)  # small integers: exact in floating point
    r = x - lattice_point(z, G)
    half_norms = 0.5 * (G * G).sum(dim=-2)
    for _ in range(sweeps):
        before = z.clone()
        for i in range(G.shape[-1]):
            g = G[..., :, i].unsqueeze(-2)  # [..., 1, d]
            corr = (r * g).sum(-1)
            zi = z[..., i]
            moved = torch.clamp(zi + corr.sign() * (corr.abs() > half_norms[..., i:i + 1]), lo, hi)
            r.addcmul_((moved - zi).unsqueeze(-1), g, value=-1.0)
            z[..., i] = moved
        if torch.equal(z, before):
            break
    return z.to(torch.int64)


def clip_mu(mu: Tensor) -> Tensor:
    """mu limited to [10, 255]: below 10 companding does little, above 255 it flattens the tails."""
    return mu.clamp(MU_MIN, MU_MAX)


def mu_law(x: Tensor, mu: Tensor | float) -> Tensor:
    """y = sign(x) ln(1 + mu |x|) / ln(1 + mu) for x in [-1, 1]: finer steps near zero.

    mu broadcasts against x (one per group); it is used as given, clip it with clip_mu first.
    """
    mu = torch.as_tensor(mu, dtype=x.dtype, device=x.device)
    return torch.sign(x) * torch.log1p(mu * x.abs()) / torch.log1p(mu)


def mu_law_inverse(y: Tensor, mu: Tensor | float) -> Tensor:
    """x = sign(y) ((1 + mu)^|y| - 1) / mu, the exact inverse of mu_law on [-1, 1]."""
    mu = torch.as_tensor(mu, dtype=y.dtype, device=y.device)
    return torch.sign(y) * torch.expm1(y.abs() * torch.log1p(mu)) / mu


def cholesky_init(groups: Tensor, bits: int) -> Tensor:
    """Initial G [..., d, d] (lower triangular) for weight vectors groups [..., n, d], already
    companded; leading dims are independent groups.

    G = L * k / 2**(bits-1) with L L^T = groups^T groups / n + ridge and k = max |L^-1 x|, the
    largest whitened (Mahalanobis) coordinate of the sample. Babai codes are then
    z = round(L^-1 x / (k / 2**(bits-1))), each in [-2**(bits-1), 2**(bits-1)]: the sample
    spans the code range, only the top level can clip, by one step. The lattice follows the
    data's correlations, so the codes are spent where the data is.

    Ours, not pinned down by what we read of the paper: the moment matrix is taken about the
    origin, not the mean, because the lattice has no offset and must reach the data from 0;
    the ridge (1e-6 of the mean diagonal) keeps the factor defined for rank-deficient samples
    (n < d); k covers the sample maximum rather than a quantile.
    """
    x = groups.to(torch.promote_types(groups.dtype, torch.float32))
    n, d = x.shape[-2:]
    moment = x.mT @ x / n
    tiny = torch.finfo(x.dtype).tiny
    ridge = 1e-6 * moment.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=tiny)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    L = torch.linalg.cholesky(moment + ridge[..., None, None] * eye)
    whitened = torch.linalg.solve_triangular(L, x.mT, upper=False)
    k = whitened.abs().amax((-2, -1)).clamp(min=tiny)
    return L * (k / 2 ** (bits - 1))[..., None, None]
