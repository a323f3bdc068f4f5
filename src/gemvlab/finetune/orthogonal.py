"""Block-diagonal orthogonal matrices from skew-symmetric generators (the Cayley transform).

OFT keeps a finetuned layer's weight a rotation of the pretrained one: each block of the
rotation is R = (I + Q)(I - Q)^-1 with Q skew-symmetric, which is orthogonal for every Q, so
training can move Q freely. The exact transform needs a solve per block; OFTv2 replaces the
inverse by a truncated Neumann series, a few small matrix products that GPUs run well, at the
price of R being only nearly orthogonal. Every function here is batched over the blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def skew_symmetric(params: Tensor, block_size: int) -> Tensor:
    """params [r, b(b-1)/2] -> Q [r, b, b] with Q = U - U^T.

    U holds params above its diagonal in row-major order (torch.triu_indices, offset 1), the
    layout peft's OFT uses, so its parameters copy into ours unchanged.
    """
    n = block_size * (block_size - 1) // 2
    if params.dim() != 2 or params.shape[1] != n:
        raise ValueError(f"skew-symmetric parameters for block size {block_size} must have "
                         f"shape [blocks, {n}], got {list(params.shape)}")
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=params.device)
    upper = params.new_zeros(params.shape[0], block_size, block_size)
    upper[:, rows, cols] = params
    return upper - upper.transpose(-2, -1)


def _eye_like(q: Tensor) -> Tensor:
    return torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)


def cayley(q: Tensor) -> Tensor:
    """The exact Cayley transform R = (I + Q)(I - Q)^-1 of each block of Q [r, b, b].

    Solved as R (I - Q) = I + Q: a solve is cheaper and more accurate than forming the inverse.
    I - Q is never singular for skew-symmetric Q (its eigenvalues are 1 - i*lambda).
    """
    eye = _eye_like(q)
    return torch.linalg.solve(eye - q, eye + q, left=False)


def cayley_neumann(q: Tensor, terms: int) -> Tensor:
    """The Cayley transform with (I - Q)^-1 replaced by its truncated Neumann series.

    ``terms`` counts the terms of the polynomial in Q that R becomes:

        R_n = (I + Q)(I + Q + ... + Q^(n-2)) = I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1),

    and R_1 = I. This is peft's ``num_cayley_neumann_terms`` for n = 1 and every n >= 4,
    its default 5 included (R_5 = I + 2Q + 2Q^2 + 2Q^3 + Q^4); peft's n = 2 gives I + 2Q and
    its n = 3 the same polynomial as n = 4, which this function does not copy.

    Because (I - Q)(I + ... + Q^(p-1)) = I - Q^p, R_n = R (I - Q^p) with p = n - 1 and R the
    exact transform, so ||R_n - R||_F = ||Q^p||_F and R_n^T R_n - I =
    -(1 + (-1)^p) Q^p + (-1)^p Q^(2p): an odd p (even n) is orthogonal to order 2p, an even p
    only to order p. The series converges when every block has spectral norm below 1.
    """
    if terms < 1:
        raise ValueError(f"a Cayley-Neumann transform needs at least 1 term, got {terms}")
    eye = _eye_like(q)
    if terms <= 2:
        return eye.clone() if terms == 1 else eye + q
    r, power = eye + 2 * q, q
    for _ in range(terms - 3):
        power = power @ q
        r = r + 2 * power
    return r + power @ q


def orthogonality_error(r: Tensor) -> Tensor:
    """||R^T R - I||_F over all blocks of R [r, b, b]: the root of the summed squares."""
    gram = r.transpose(-2, -1) @ r
    return torch.linalg.matrix_norm(gram - _eye_like(gram)).square().sum().sqrt()
