"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): per-group weight quantization with error
feedback through the inverse Hessian of the layer's output error.

Layout follows nn.Linear: calibration activations X [T, K], weights W [N, K], Y = X W^T. The
paper quantizes W one input column at a time and spreads each column's rounding error over the
not-yet-quantized columns, weighted by the upper Cholesky factor of H^-1, H = 2/T X^T X.
Everything runs in float64: H sums many token outer products, and the Cholesky factorizations
of a poorly conditioned H are where float32 breaks first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gemvlab.quant.groupwise import GroupQuant, check_groups, group_params


def hessian(x: Tensor) -> Tensor:
    """H = 2/T X^T X [K, K] in float64 of activations x [..., K] (leading dims are tokens).

    The product runs in x's precision (at least float32; a batch's sum stays accurate there)
    and is then widened, so the running mean over batches accumulates in float64.
    """
    x = x.reshape(-1, x.shape[-1])
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return (2.0 / x.shape[0]) * (x.t() @ x).double()


def accumulate_hessian(h: Tensor | None, count: int, x: Tensor) -> tuple[Tensor, int]:
    """Running H over calibration batches: (H, tokens so far) updated with x [..., K].

    Kept as a running mean rather than a sum so that H stays O(1) however many tokens pass;
    the result equals hessian() of all batches concatenated.
    """
    t = x.numel() // x.shape[-1]
    batch = hessian(x)
    if h is None:
        return batch, t
    total = count + t
    return h * (count / total) + batch * (t / total), total


def inverse_hessian_factor(w: Tensor, H: Tensor, damp: float,
                           perm: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(W float64 copy, U) for error feedback: U the upper Cholesky factor of H^-1, H damped.

    Quantizing column j moves each later column c by -(w_j - q_j) / U_jj * U_jc, the OBS
    update of the paper (eq. 3 in Cholesky form). Dead inputs (H_ii == 0, never active in
    calibration) get H_ii = 1 and zero weights, since nothing constrains them; ``damp`` *
    mean(diag H) on the diagonal makes H invertible. ``perm`` reorders the columns first.
    """
    W = w.double().clone()
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return W, U


def gptq_quantize(w: Tensor, H: Tensor, bits: int, group_size: int, *, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128) -> GroupQuant:
    """GPTQ codes of W [N, K] given H [K, K]: the same GroupQuant as RTN, so it dequantizes alike.

    Dead inputs and damping as in inverse_hessian_factor. With ``act_order`` columns go in
    order of decreasing H_ii: the most active inputs are quantized first, while many columns
    are still left to absorb their error.
    Updates to columns past the current block of ``block_size`` are applied lazily, once per
    block (the paper's batching); a group's scale and zero point come from its current,
    error-updated weights when its first column is reached, including updates still pending.
    """
    n, k = w.shape
    check_groups(k, group_size, bits)
    if tuple(H.shape) != (k, k):
        raise ValueError(f"H must be [K, K] = [{k}, {k}] for W {list(w.shape)}, "
                         f"got {list(H.shape)}")
    if block_size < 1 or damp < 0:
        raise ValueError(f"need block_size >= 1 and damp >= 0, got {block_size} and {damp}")

    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None)
    W, U = inverse_hessian_factor(w, H, damp, perm)

    # Codes as float64 while the loop runs (few ops per column: the loop is overhead-bound);
    # round(w / scale) + zero, clamped, is quantize_with's formula, ties included.
    codes = torch.empty(n, k, dtype=torch.float64, device=w.device)
    maxq = 2**bits - 1
    scales, zeros = [], []
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        err = torch.zeros(n, b1 - b0, dtype=torch.float64, device=w.device)
        for j in range(b0, b1):
            if j % group_size == 0:
                group = W[:, j:j + group_size].clone()
                if j + group_size > b1:  # columns past the block still miss this block's errors
                    group[:, b1 - j:] -= err[:, :j - b0] @ U[b0:j, b1:j + group_size]
                scale, zero = group_params(group, bits)
                scales.append(scale)
                zeros.append(zero)
                s, z = scale[:, 0].double(), zero[:, 0].double()
            q = torch.round(W[:, j] / s).add_(z).clamp_(0, maxq)
            codes[:, j] = q
            e = (W[:, j] - (q - z) * s).div_(U[j, j])
            W[:, j + 1:b1].addr_(e, U[j, j + 1:b1], alpha=-1)
            err[:, j - b0] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]

    return GroupQuant(codes.to(torch.uint8), torch.cat(scales, dim=1), torch.cat(zeros, dim=1),
                      bits, group_size, perm)
