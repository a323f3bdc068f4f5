"""Weight-only per-group asymmetric quantization and round-to-nearest (RTN), the baseline of
GPTQ (Frantar et al. 2022, arXiv 2210.17323) and GLVQ (arXiv 2510.20984).

Layout follows nn.Linear: W [N, K] (outputs x input features). Each row is cut into K / g
groups of g consecutive input columns; each group has its own scale and integer zero point, and
value = (code - zero) * scale.

Scales are stored as float16 (what bits_per_weight counts) and rounded *up* to float16, so the
grid of 2^bits codes still spans the group's range and no weight is clipped: the round-trip
error stays within scale / 2 for every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Smallest positive float16 (subnormal): the scale of an all-zero group, whose codes are then
# all equal to its zero point and dequantize to exact zeros.
_MIN_SCALE = 2.0**-24


def check_groups(k: int, group_size: int, bits: int) -> None:
    """Codes fit uint8 (1..8 bits) and the K input columns split into whole groups."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (uint8 codes), got {bits}")
    if group_size < 1 or k % group_size != 0:
        raise ValueError(
            f"K={k} input columns must split into whole groups: K % group_size == 0 is "
            f"required, got group_size={group_size}"
        )


@dataclass(frozen=True)
class GroupQuant:
    """Per-group codes of a weight W [N, K]: value = (codes - zero) * scale, group by group.

    ``codes`` uint8 [N, K] in 0..2^bits-1; ``scale`` float16 [N, K/g]; ``zero`` uint8
    [N, K/g] in 0..2^bits-1. With act-order (``perm`` set), code column j is input column
    perm[j] and groups are consecutive in that permuted order.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group_size: int
    perm: Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        check_groups(k, self.group_size, self.bits)
        groups = (n, k // self.group_size)
        if tuple(self.scale.shape) != groups or tuple(self.zero.shape) != groups:
            raise ValueError(
                f"scale and zero must be [N, K/g] = {list(groups)}, got "
                f"{list(self.scale.shape)} and {list(self.zero.shape)}"
            )
        if self.perm is not None and tuple(self.perm.shape) != (k,):
            raise ValueError(f"perm must have K={k} entries, got {list(self.perm.shape)}")

    def rows(self, start: int, stop: int) -> GroupQuant:
        """The codes of rows start..stop-1: layers quantized together split back apart."""
        return GroupQuant(self.codes[start:stop], self.scale[start:stop], self.zero[start:stop],
                          self.bits, self.group_size, self.perm)

    def dequantize(self) -> Tensor:
        """W_hat [N, K] float32 in the original column order (exact: fp16 scale x small int)."""
        scale = self.scale.float().repeat_interleave(self.group_size, dim=1)
        zero = self.zero.float().repeat_interleave(self.group_size, dim=1)
        w = (self.codes.float() - zero) * scale
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def bits_per_weight(self) -> float:
        """Storage per weight: the code, plus one fp16 scale and one ``bits``-bit zero point per
        group of g weights, plus, with act-order, each input column's group index
        (ceil(log2(K/g)) bits per column, shared by the N rows). The permutation itself is not
        counted: a deployed kernel keeps codes in the original column order and looks up the
        group of each column instead.
        """
        n, k = self.codes.shape
        total = self.bits + (16 + self.bits) / self.group_size
        if self.perm is not None:
            groups = k // self.group_size
            total += (groups - 1).bit_length() / n  # ceil(log2(groups)) for groups >= 1
        return total


def round_up_half(exact: Tensor) -> Tensor:
    """The smallest float16 >= each (finite, positive) value: a stored scale never shrinks the
    range it must cover."""
    half = exact.half()
    if not torch.isfinite(half).all():
        raise ValueError("a scale does not fit float16 (inf/nan weights?)")
    return torch.where(half.double() < exact.double(),
                       torch.nextafter(half, torch.full_like(half, torch.inf)), half)


def group_params(w_group: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale (float16 [N, 1]) and zero point (uint8 [N, 1]) of one group w_group [N, g].

    The range is min(w, 0)..max(w, 0), as in the GPTQ reference quantizer: containing 0 keeps
    round(-min / scale) inside 0..2^bits-1 without clamping, so a group of one sign is not
    clipped, and an exact zero stays exact.
    """
    maxq = 2**bits - 1
    w = w_group.double()
    lo = w.amin(dim=1, keepdim=True).clamp(max=0.0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0.0)
    # Rounded up so that maxq * scale >= max - min: every weight then lies inside the grid.
    scale = round_up_half(((hi - lo) / maxq).clamp(min=_MIN_SCALE))
    zero = torch.round(-lo / scale.double()).clamp(0, maxq).to(torch.uint8)
    return scale, zero


def quantize_with(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """uint8 codes clamp(round(w / scale) + zero, 0, 2^bits-1), scale and zero broadcast to w."""
    q = torch.round(w.double() / scale.double()) + zero.double()
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def rtn_quantize(w: Tensor, bits: int, group_size: int) -> GroupQuant:
    """Round-to-nearest of W [N, K]: each group's own min/max grid, no error feedback."""
    n, k = w.shape
    check_groups(k, group_size, bits)
    groups = w.reshape(n * (k // group_size), group_size)
    scale, zero = group_params(groups, bits)
    codes = quantize_with(groups, scale, zero, bits).reshape(n, k)
    return GroupQuant(codes, scale.reshape(n, -1), zero.reshape(n, -1), bits, group_size)
