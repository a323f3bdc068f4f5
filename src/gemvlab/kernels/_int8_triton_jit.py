"""Triton kernels behind ``int8_triton.llm_int8_linear``.

A separate module so that ``triton`` is imported only when a kernel is first launched: the
package itself must import on CPU-only machines without triton. Offsets are int32, so every
tensor here must hold fewer than 2**31 elements.
"""

import triton
import triton.language as tl


@triton.jit
def outlier_columns_kernel(x_ptr, flags_ptr, M, K, stride_xm, threshold, ROWS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    """flags[k] = 1 where some row m has |x[m, k]| >= threshold.

    Each program covers BLOCK_K columns of ROWS rows. With one program along M (M <= ROWS) it
    stores its flags; with several (ATOMIC) it max-es them into a zeroed buffer, only for the
    rare columns that hit, so the atomics cost nothing.
    """
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = rk < K
    row0 = tl.program_id(1) * ROWS
    hit = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    for r in range(0, ROWS, BLOCK_M):
        rm = row0 + r + tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & in_k[None, :], other=0.0)
        hit = tl.maximum(hit, (tl.abs(x.to(tl.float32)) >= threshold).to(tl.int32))
    col_hit = tl.max(hit, axis=0)
    if ATOMIC:
        tl.atomic_max(flags_ptr + rk, col_hit, mask=in_k & (col_hit > 0))
    else:
        tl.store(flags_ptr + rk, col_hit, mask=in_k)


@triton.jit
def _round_half_even(v):
    """torch.round's rule (ties to even), exact: v - floor(v) has no rounding error here."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return f + up.to(tl.float32)


@triton.jit
def quantize_rows_kernel(x_ptr, flags_ptr, q_ptr, sx_ptr, idx_ptr, count_ptr, M, K, stride_xm,
                         stride_qm, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_R token rows per program: absmax scale of the non-outlier entries, then int8 codes.

    Float32 with IEEE division and ties-to-even, the steps of ``quant.int8.quantize``, so codes
    and scales match the reference bit for bit. Program 0 also lists the outlier columns in
    order (a prefix sum over the flags): a fixed summation order for the outlier product.
    """
    pid = tl.program_id(0)
    rr = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = rr < M
    amax = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    total = 0
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_k = rk < K
        out = tl.load(flags_ptr + rk, mask=in_k, other=0)
        x = tl.load(x_ptr + rr[:, None] * stride_xm + rk[None, :],
                    mask=in_r[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.where(out[None, :] != 0, 0.0, tl.abs(x)))
        if pid == 0:
            tl.store(idx_ptr + total + tl.cumsum(out, axis=0) - 1, rk, mask=out != 0)
            total += tl.sum(out, axis=0)
    if pid == 0:
        tl.store(count_ptr, total)
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=1), 127.0), 1e-12)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_k = rk < K
        out = tl.load(flags_ptr + rk, mask=in_k, other=0)
        x = tl.load(x_ptr + rr[:, None] * stride_xm + rk[None, :],
                    mask=in_r[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        v = tl.math.div_rn(tl.where(out[None, :] != 0, 0.0, x), scale[:, None])
        q = tl.minimum(tl.maximum(_round_half_even(v), -127.0), 127.0)
        tl.store(q_ptr + rr[:, None] * stride_qm + rk[None, :], q.to(tl.int8),
                 mask=in_r[:, None] & in_k[None, :])
    tl.store(sx_ptr + rr, scale, mask=in_r)


@triton.jit
def int8_matmul_kernel(q_ptr, w_ptr, sx_ptr, sw_ptr, x_ptr, idx_ptr, count_ptr, bias_ptr, y_ptr,
                       M, N, K, stride_qm, stride_wn, stride_xm, stride_ym,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """y = s_x s_w (q_x q_w^T) + s_w (x_O q_w[:, O]^T) (+ bias), one [BLOCK_M, BLOCK_N] tile.

    The int8 product accumulates exactly in int32 on the tensor cores; the outlier columns O
    (read through the index list, so nothing waits on the host) follow as a float-accumulated
    product of the 16-bit activations with the int8 weight codes (exact in 16 bits), and s_w
    scales both at once.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each weight tile while it is in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows and columns past the edge load a valid neighbour; the store drops them.
    lm = rm % M
    ln = rn % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = q_ptr + lm[:, None] * stride_qm + rk[None, :]
    b_ptrs = w_ptr + ln[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    accf = acc.to(tl.float32) * tl.load(sx_ptr + lm)[:, None]
    n_out = tl.load(count_ptr)
    for j0 in range(0, n_out, BLOCK_O):
        rj = j0 + tl.arange(0, BLOCK_O)
        in_j = rj < n_out
        cols = tl.load(idx_ptr + rj, mask=in_j, other=0)
        xo = tl.load(x_ptr + lm[:, None] * stride_xm + cols[None, :], mask=in_j[None, :],
                     other=0.0)
        wo = tl.load(w_ptr + ln[None, :] * stride_wn + cols[:, None], mask=in_j[:, None],
                     other=0)
        accf = tl.dot(xo, wo.to(xo.dtype), accf)

    y = accf * tl.load(sw_ptr + ln)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + ln).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
