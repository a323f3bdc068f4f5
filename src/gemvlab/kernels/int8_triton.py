"""LLM.int8() linear forward on CUDA through Triton (Dettmers et al. 2022, arXiv 2208.07339).

Same function as ``gemvlab.quant.int8.quantized_matmul(x, w, per_row=True, zeropoint=False,
threshold=t)``: input columns where any token reaches |x| >= t are taken out and multiplied in
float with the int8 weight codes; the rest is quantized per token (absmax / 127, ties to even),
multiplied exactly in int32 and rescaled by s_x[m] s_w[n]. Why a kernel of our own: decode
(M <= 16) is bound by reading the weights, so int8 weights should take half the time of fp16;
bitsandbytes and ``torch._int_mm`` lose that on the way (FACTS.md).

Three launches (and a memset above ``SMALL_M`` rows): outlier-column flags; row quantization,
which also lists the outlier columns in order; one int8 matmul whose epilogue adds the
outlier product, the scales and the bias. Outlier entries are read through that device-side
list, so no step waits on the host and a call can be captured in a CUDA graph.

``triton`` is imported on first use, so this module imports on machines without it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

# Token counts up to this take the decode (GEMV-shaped) tiles, and one flag program per
# column block covers all rows.
SMALL_M = 16
# Columns of the outlier product per step: the smallest K of a 16-bit tensor-core dot is 16.
_BLOCK_O = 32


@dataclass(frozen=True)
class PrepConfig:
    """Tiles of the outlier-flag kernel (rows per program, rows per step, columns) and of the
    quantize kernel (rows per program, columns per step)."""

    flag_rows: int
    flag_block_m: int
    flag_block_k: int
    quant_rows: int
    quant_block_k: int


# Decode: a single program along M; rows of 4096 (Llama-7B's K) in one step.
_PREP_SMALL = PrepConfig(SMALL_M, SMALL_M, 256, 2, 4096)
# Above SMALL_M; fastest of five tilings on an H100 at 4096x4096x4096 (217 vs 226 to 289 us
# for the whole call) and tied at 4096x12288x12288.
PREP = PrepConfig(512, 64, 128, 8, 1024)


@dataclass(frozen=True)
class MatmulConfig:
    """Tile shape and launch settings of the int8 matmul kernel."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def pick_config(m: int, n: int, k: int) -> MatmulConfig:
    """Tiles for H100: narrow deep tiles for decode (many programs streaming W), wgmma-sized
    128x256x128 tiles for prefill-sized M. K tiles shrink to K for tiny problems.

    On an H100 the decode tile was the best or tied among seven tilings at 1x4096x11008 and
    16x4096x4096, and 128x256x128 the best or tied among five at 4096x4096x4096 and
    4096x12288x12288 (2026-11, Triton 3.6); 16 < M <= 256 is untuned.
    """
    if m <= SMALL_M:
        cfg = MatmulConfig(16, 32, 512, 4, 4)
    elif m <= 64:
        cfg = MatmulConfig(64, 64, 256, 4, 4)
    elif m <= 256:
        cfg = MatmulConfig(128, 128, 128, 8, 3)
    else:
        cfg = MatmulConfig(128, 256, 128, 8, 3)
    block_k = min(cfg.block_k, max(32, _next_pow2(k)))
    return MatmulConfig(cfg.block_m, cfg.block_n, block_k, cfg.num_warps, cfg.num_stages,
                        cfg.group_m)


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x: Tensor, q_w: Tensor, s_w: Tensor, bias: Tensor | None) -> None:
    # Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, slowly.
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("llm_int8_linear runs on CUDA tensors only; on CPU use "
                         "gemvlab.quant.int8.quantized_matmul")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float16 or bfloat16, got {x.dtype}")
    if q_w.dtype != torch.int8 or q_w.dim() != 2:
        raise TypeError(f"q_w must be int8 [N, K], got {q_w.dtype} {tuple(q_w.shape)}")
    n, k = q_w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, q_w has {k}")
    if s_w.numel() != n:
        raise ValueError(f"s_w must hold one scale per output row ({n}), got {s_w.numel()}")
    if bias is not None and bias.numel() != n:
        raise ValueError(f"bias must hold {n} values, got {bias.numel()}")
    if k >= 2**17:
        raise ValueError("K >= 2**17 could overflow the int32 accumulator")
    if max(x.numel(), q_w.numel(), x.numel() // k * n) >= 2**31:
        raise ValueError("the kernels use int32 offsets: x, q_w and the output must each hold "
                         "fewer than 2**31 elements")
    if any(t.device != x.device for t in (q_w, s_w) + ((bias,) if bias is not None else ())):
        raise ValueError("x, q_w, s_w and bias must be on the same device")


def llm_int8_linear(x: Tensor, q_w: Tensor, s_w: Tensor, threshold: float | None,
                    bias: Tensor | None = None) -> Tensor:
    """LLM.int8() ``x @ (q_w * s_w)^T + bias`` for x [..., K] fp16/bf16, q_w int8 [N, K] and
    s_w float32 [N] (or [N, 1]); result in x.dtype. A threshold that is None or <= 0 turns the
    outlier decomposition off, as in ``quant.int8.outlier_columns``.
    """
    _check(x, q_w, s_w, bias)
    from gemvlab.kernels import _int8_triton_jit as jit

    lead = x.shape[:-1]
    n, k = q_w.shape
    x = x.reshape(-1, k).contiguous()
    q_w = q_w.contiguous()
    s_w = s_w.reshape(-1).to(torch.float32).contiguous()
    m = x.shape[0]
    dev = x.device
    thr = float(threshold) if threshold and threshold > 0 else math.inf

    q_x = torch.empty((m, k), dtype=torch.int8, device=dev)
    s_x = torch.empty(m, dtype=torch.float32, device=dev)
    idx = torch.empty(k, dtype=torch.int32, device=dev)
    count = torch.empty(1, dtype=torch.int32, device=dev)
    prep = _PREP_SMALL if m <= SMALL_M else PREP
    several = m > prep.flag_rows
    flags = (torch.zeros if several else torch.empty)(k, dtype=torch.int32, device=dev)
    jit.outlier_columns_kernel[(_cdiv(k, prep.flag_block_k), _cdiv(m, prep.flag_rows))](
        x, flags, m, k, x.stride(0), thr, ROWS=prep.flag_rows, BLOCK_M=prep.flag_block_m,
        BLOCK_K=prep.flag_block_k, ATOMIC=several)
    jit.quantize_rows_kernel[(_cdiv(m, prep.quant_rows),)](
        x, flags, q_x, s_x, idx, count, m, k, x.stride(0), q_x.stride(0),
        BLOCK_R=prep.quant_rows, BLOCK_K=min(max(_next_pow2(k), 16), prep.quant_block_k),
        num_warps=8)

    cfg = pick_config(m, n, k)
    y = torch.empty((m, n), dtype=x.dtype, device=dev)
    grid = (_cdiv(m, cfg.block_m) * _cdiv(n, cfg.block_n),)
    jit.int8_matmul_kernel[grid](
        q_x, q_w, s_x, s_w, x, idx, count, bias if bias is not None else y, y, m, n, k,
        q_x.stride(0), q_w.stride(0), x.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        EVEN_K=k % cfg.block_k == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, BLOCK_O=_BLOCK_O, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return y.reshape(*lead, n)
