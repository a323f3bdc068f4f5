"""Int8 quantizers and the int8 matmul of LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339).

Layout follows nn.Linear: activations X [T, K] (tokens x input features), weights W [N, K]
(outputs x input features), Y = X W^T. The paper's "columns of W" are our rows.

Every product runs on integers: int8 codes are multiplied exactly (``torch._int_mm``, or an
exact float64 accumulation of the same integers where ``_int_mm`` refuses the shape) and scaled
once at the end, so the integer accumulator equals the fake-quant reference's bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Keeps an all-zero row or tensor from dividing by zero; its codes are then all zero.
_TINY = 1e-12


@dataclass(frozen=True)
class QTensor:
    """Int8 codes with scale and optional zero point: value = (q - zero) * scale.

    ``scale`` and ``zero`` are [rows, 1] (per-row) or 0-d (per-tensor); ``zero`` is None for
    symmetric (absmax) codes.
    """

    q: Tensor
    scale: Tensor
    zero: Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        codes = self.q.to(torch.float64)
        if self.zero is not None:
            codes = codes - self.zero.to(torch.float64)
        return (codes * self.scale.to(torch.float64)).to(dtype)

    @property
    def nbytes(self) -> int:
        """The bytes actually stored: codes, scales and zero points."""
        tensors = [self.q, self.scale] + ([self.zero] if self.zero is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def quantize(x: Tensor, *, per_row: bool, zeropoint: bool) -> QTensor:
    """Absmax (symmetric, 127 / max|x|) or zeropoint (asymmetric, 255 / (max - min)) codes.

    The zeropoint range always contains 0, so an exact zero stays exact and the zero point fits
    int8, as in the paper's asymmetric scheme.
    """
    x = x.float()
    reduce = {"dim": -1, "keepdim": True} if per_row else {}
    if zeropoint:
        lo = x.amin(**reduce).clamp(max=0.0)
        hi = x.amax(**reduce).clamp(min=0.0)
        scale = ((hi - lo) / 255.0).clamp(min=_TINY)
        zero = (-128.0 - torch.round(lo / scale)).to(torch.int32)
        q = torch.clamp(torch.round(x / scale) + zero, -128, 127).to(torch.int8)
        return QTensor(q, scale, zero)
    scale = (x.abs().amax(**reduce) / 127.0).clamp(min=_TINY)
    q = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    return QTensor(q, scale, None)


def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer a @ b^T for int8 a [T, K] and b [N, K]: int32 from torch._int_mm, else int64.

    ``torch._int_mm`` accumulates in int32, exact for K < 2**17; CUDA refuses T <= 16, so small
    T is zero-padded to 32 rows there. Other cases accumulate in float64, exact for such sums.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_mm takes int8 codes, got {a.dtype} and {b.dtype}")
    fits = a.shape[1] < 2**17  # (-128)^2 * 2**17 = 2**31 would overflow int32
    rows = a.shape[0]
    if fits and a.is_cuda and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0:
        padded = a if rows > 16 else torch.nn.functional.pad(a, (0, 0, 0, 32 - rows))
        return torch._int_mm(padded, b.t())[:rows]
    if fits and not a.is_cuda:
        try:
            return torch._int_mm(a.contiguous(), b.t())
        except RuntimeError:
            pass
    return (a.double() @ b.double().t()).to(torch.int64)


def integer_accumulator(x: QTensor, w: QTensor) -> Tensor:
    """Exact sum_k (qx - zx)(qw - zw) [T, N], from int8 products only (int64 with zero points).

    With zero points the product expands into qx qw^T and row/column sums, all exact integers,
    which is how zeropoint quantization runs on int8 hardware.
    """
    acc = int8_mm(x.q, w.q)
    if x.zero is None and w.zero is None:
        return acc
    acc = acc.to(torch.int64)
    k = x.q.shape[1]
    zero = torch.zeros((), dtype=torch.int64, device=acc.device)
    zx = zero if x.zero is None else x.zero.to(torch.int64).reshape(-1, 1)  # [T, 1]
    zw = zero if w.zero is None else w.zero.to(torch.int64).reshape(1, -1)  # [1, N]
    sum_x = x.q.to(torch.int64).sum(dim=1, keepdim=True)                  # [T, 1]
    sum_w = w.q.to(torch.int64).sum(dim=1, keepdim=True).t()              # [1, N]
    acc -= sum_x * zw
    acc -= zx * sum_w
    acc += k * zx * zw
    return acc


def rescale(acc: Tensor, x: QTensor, w: QTensor) -> Tensor:
    """The one float step, in float64: accumulator times activation and weight scales."""
    y = acc.to(torch.float64)
    y.mul_(x.scale.to(torch.float64).reshape(-1, 1))
    y.mul_(w.scale.to(torch.float64).reshape(1, -1))
    return y


def outlier_columns(x: Tensor, threshold: float | None) -> Tensor:
    """Input feature dims where any token reaches |x| >= threshold (none when threshold is off)."""
    if not threshold or threshold <= 0:
        return torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
    return (x.abs() >= threshold).any(dim=0)


def quantized_matmul(x: Tensor, w: QTensor, *, per_row: bool, zeropoint: bool,
                     threshold: float | None = None) -> Tensor:
    """Y = X W^T with int8 X (per tensor or per token) and int8 W; float64 result [T, N].

    With a threshold this is LLM.int8(): outlier input dims (any |x| >= threshold) are taken out
    of X before it is quantized and multiplied in float with the dequantized int8 weight columns,
    as bitsandbytes does when the fp16 weights are not kept; the rest runs on int8.
    """
    x = x.float()
    outliers = outlier_columns(x, threshold)
    regular = x.masked_fill(outliers, 0.0)
    # Masked dims quantize to the zero point (0 for absmax), so they add exactly nothing.
    xq = quantize(regular, per_row=per_row, zeropoint=zeropoint)
    y = rescale(integer_accumulator(xq, w), xq, w)
    if outliers.any():
        w_cols = QTensor(w.q[:, outliers], w.scale, w.zero).dequantize(torch.float64)
        y = y + x[:, outliers].double() @ w_cols.t()
    return y
