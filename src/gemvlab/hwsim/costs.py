"""Operator cost models of one decode step: GEMMs on systolic arrays, GEMVs in PIM banks.

Every function is pure and vectorised over numpy arrays where the simulator needs it (one
attention GEMV per request and head, thousands per iteration).
"""

from __future__ import annotations

import numpy as np

from gemvlab.hwsim.hardware import NPU, PIM


def gemm_cost(m: int, k: int, n: int, bytes_per_elem: int) -> tuple[int, int]:
    """(flops, bytes) of x[m,k] @ W[k,n]: each input read once, the output written once."""
    return 2 * m * k * n, (m * k + k * n + m * n) * bytes_per_elem


def gemm_ns(npu: NPU, mem_gbs: float, m: int, k: int, n: int) -> float:
    """x[m,k] @ W[k,n] on weight-stationary arrays, compute against weight streaming.

    W is cut into array_dim x array_dim tiles spread over the arrays. A tile's weights are
    double-buffered (the next tile loads while this one computes), so each tile costs
    max(m, array_dim) cycles (m input rows stream through; loading array_dim weight rows takes
    array_dim cycles), plus one fill and drain of 2 * array_dim cycles per array. Inputs,
    weights and outputs cross the memory bus once; the GEMM takes the longer of the two.
    """
    s = npu.array_dim
    tiles = -(-k // s) * -(-n // s)
    rounds = -(-tiles // npu.arrays)
    compute = (rounds * max(m, s) + 2 * s) / npu.freq_ghz
    memory = gemm_cost(m, k, n, npu.bytes_per_elem)[1] / mem_gbs
    return max(compute, memory)


def vector_ns(npu: NPU, elements: float, ops_per_element: float = 1.0) -> float:
    """Element-wise work (softmax, layer norm, GELU, residuals) on the vector units."""
    return elements * ops_per_element / (npu.vector_units * npu.vector_lanes * npu.freq_ghz)


def npu_gemv_ns(npu: NPU, mem_gbs: float, matrix_bytes: float) -> float:
    """Attention GEMVs on the NPU: every KV byte crosses the bus once, one MAC per element
    on the vector units; bandwidth-bound unless the vector units are very narrow."""
    macs = matrix_bytes / npu.bytes_per_elem
    return max(matrix_bytes / mem_gbs, vector_ns(npu, macs))


def bank_row_ns(pim: PIM) -> float:
    """One full DRAM row through a bank's MACs: activate, every column, precharge.

    A column command reads access_bytes; its values take ceil(values / multipliers) cycles of
    the bank's multipliers, and column commands to one bank are tCCD_L apart. tRAS bounds
    activate-to-precharge from below.
    """
    values = pim.access_bytes // 2
    column = max(pim.tCCD_L, -(-values // pim.multipliers_per_bank))
    columns = pim.page_bytes // pim.access_bytes
    return (max(pim.tRAS, pim.tRCD + columns * column) + pim.tRP) * pim.tck_ns


def pim_gemv_ns(pim: PIM, matrix_bytes: np.ndarray, io_bytes: np.ndarray) -> np.ndarray:
    """A GEMV whose matrix is spread over one channel's banks, all banks in lock step.

    The matrix fills ceil(bytes / page) rows, ceil(rows / banks) per bank; the input vector
    is written to the banks and the outputs read back over the channel bus (io_bytes).
    """
    rows = np.ceil(np.asarray(matrix_bytes, dtype=float) / pim.page_bytes)
    rounds = np.ceil(rows / pim.banks)
    return rounds * bank_row_ns(pim) + np.asarray(io_bytes, dtype=float) / pim.channel_gbs


def pim_attention_ns(pim: PIM, contexts: np.ndarray, heads: int, head_dim: int,
                     bytes_per_elem: int, slots: np.ndarray) -> float:
    """One of a layer's two attention GEMVs for a batch in PIM: the score GEMV (q K^T) and
    the context GEMV (p V) read the same bytes, so they cost the same.

    Each (request, head) keeps its K and V in one channel, chosen by its batch slot
    ((slot * heads + head) mod channels), so channels run in parallel and the slowest one
    sets the time.
    """
    ctx = np.asarray(contexts, dtype=float)
    per = pim_gemv_ns(pim, ctx * head_dim * bytes_per_elem,
                      (ctx + head_dim) * bytes_per_elem)
    channel = (np.asarray(slots)[:, None] * heads + np.arange(heads)[None, :]) % pim.channels
    load = np.bincount(channel.ravel(), weights=np.repeat(per, heads),
                       minlength=pim.channels)
    return float(load.max()) if load.size else 0.0
