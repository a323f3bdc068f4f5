"""Triton kernels behind ``lattice_gemv``'s CUDA path: fused decode GEMV of packed codes.

A separate module so that ``triton`` is imported only when a kernel is first launched. Grid:
(row blocks, token rows); each program decodes BLOCK_N rows of the weight from the bit planes
(see ``lattice_gemv``) straight into registers and never writes the decoded weight. A K step of
BLOCK_K columns lies inside one group (BLOCK_K divides the group size), so the group's factors
(RTN scale and zero; GLVQ scale, G and mu) are loaded once per step and the per-(row, group)
ones are applied to the step's partial sum rather than to every weight. UNROLL steps share one
loop iteration, so more loads are in flight: one group of a few rows is only a few hundred
bytes. On an H100 that made RTN 1.7x faster at 4096x4096 (8 steps, 2 rows, 1 warp); GLVQ's
best tile keeps 1 step (its lattice product, not its loads, bounds it). Offsets are int32:
every tensor must hold fewer than 2**31 elements.
"""

import triton
import triton.language as tl


@triton.jit
def _field(plane_ptr, n, K, kk, rk, mask, W: tl.constexpr):
    """Bits of width W of the codes at rows n, columns kk + rk (kk a multiple of 32, so the
    word index and shift split into a per-step scalar and loop-invariant tensors)."""
    PER: tl.constexpr = 32 // W
    word = tl.load(plane_ptr + n * (K // PER) + kk // PER + rk // PER, mask=mask, other=0)
    return (word >> ((rk % PER) * W)) & ((1 << W) - 1)


@triton.jit
def _codes(p0, p1, p2, n, K, kk, rk, mask, W0: tl.constexpr, W1: tl.constexpr,
           W2: tl.constexpr):
    """Unsigned codes from up to three planes (width 0: no such plane), low bits first."""
    u = _field(p0, n, K, kk, rk, mask, W0)
    if W1 > 0:
        u = u | (_field(p1, n, K, kk, rk, mask, W1) << W0)
    if W2 > 0:
        u = u | (_field(p2, n, K, kk, rk, mask, W2) << (W0 + W1))
    return u


@triton.jit
def rtn_gemv_kernel(x_ptr, p0, p1, p2, s_ptr, z_ptr, y_ptr, N, K, GROUP,
                    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr):
    """y[m, n] = sum_q s[n, q] (sum_{k in q} u[n, k] x[m, k] - z[n, q] sum_{k in q} x[m, k])."""
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    in_n = rn < N
    groups = K // GROUP
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * UNROLL):
        for i in tl.static_range(UNROLL):
            kk = k0 + i * BLOCK_K
            live = in_n & (kk < K)
            u = _codes(p0, p1, p2, rn[:, None], K, kk, rk[None, :], live[:, None], W0, W1, W2)
            x = tl.load(x_ptr + m * K + kk + rk, mask=kk + rk < K, other=0.0).to(tl.float32)
            part = tl.sum(u.to(tl.float32) * x[None, :], axis=1)
            q = rn * groups + kk // GROUP
            s = tl.load(s_ptr + q, mask=live, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + q, mask=live, other=0).to(tl.float32)
            acc += s * (part - z * tl.sum(x, axis=0))
    tl.store(y_ptr + m * N + rn, acc.to(y_ptr.dtype.element_ty), mask=in_n)


@triton.jit
def glvq_gemv_kernel(x_ptr, p0, p1, p2, g_ptr, mu_ptr, s_ptr, y_ptr, N, K, GROUP, G_STRIDE,
                     MU_STRIDE, OFFSET, INV_SPAN,
                     W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, D: tl.constexpr,
                     DV: tl.constexpr, HAS_MU: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UNROLL: tl.constexpr):
    """GLVQ decode GEMV. A step's tile is [R, DV] with R = BLOCK_N * BLOCK_K / DV rows of DV
    codes: DV / D lattice vectors side by side (DV = max(D, 16), the narrowest tensor-core
    product), so one tl.dot with the block-diagonal diag(G, .., G)^T decodes them all. Codes
    c = u + OFFSET and G are exact in fp16, accumulation is fp32: the lattice points match the
    float reference. Companding: w = sign(y) (2^(t log2(1 + mu)) - 1) / mu, t = min(|y|, 1).
    """
    KV: tl.constexpr = BLOCK_K // DV
    R: tl.constexpr = BLOCK_N * KV
    m = tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    r = tl.arange(0, R)
    j = tl.arange(0, DV)
    rn = n0 + r // KV
    in_n = rn < N
    rk = ((r % KV) * DV)[:, None] + j[None, :]
    # B[j, i] = G[i % D, j % D] on the diagonal blocks: y[r, i] = sum_j c[r, j] B[j, i].
    b_off = (j[None, :] % D) * D + (j[:, None] % D)
    b_diag = (j[:, None] // D) == (j[None, :] // D)
    groups = K // GROUP
    acc = tl.zeros([R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K * UNROLL):
        for i in tl.static_range(UNROLL):
            kk = k0 + i * BLOCK_K
            live = in_n & (kk < K)
            q = kk // GROUP
            u = _codes(p0, p1, p2, rn[:, None], K, kk, rk, live[:, None], W0, W1, W2)
            c = (u.to(tl.float32) + OFFSET).to(tl.float16)
            b = tl.load(g_ptr + q * G_STRIDE + b_off, mask=b_diag & (kk < K), other=0.0)
            y = tl.dot(c, b)
            x = tl.load(x_ptr + m * K + kk + rk, mask=kk + rk < K, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + rn * groups + q, mask=live, other=0.0).to(tl.float32)
            if HAS_MU:
                mu = tl.load(mu_ptr + q * MU_STRIDE, mask=kk < K, other=1.0).to(tl.float32)
                lg = tl.log2(1.0 + mu)
                f = tl.exp2(tl.minimum(tl.abs(y) * (INV_SPAN * lg), lg)) - 1.0
                f = tl.where(y < 0, -f, f)
                acc += tl.sum(f * x, axis=1) * (s / mu)
            else:
                acc += tl.sum(y * x, axis=1) * (s * INV_SPAN)
    out = tl.sum(tl.reshape(acc, [BLOCK_N, KV]), axis=1)
    rows = n0 + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + m * N + rows, out.to(y_ptr.dtype.element_ty), mask=rows < N)
