"""KIVI-style asymmetric KV-cache quantization (arXiv 2402.02750), the CommVQ baseline.

KIVI quantizes keys per channel and values per token: key outliers live in a few fixed
channels, so grouping consecutive tokens of one channel keeps an outlier channel from
stretching the range of its neighbours; values have no such channel structure and are
grouped along the channels of one token. Each group stores an fp16 scale and an fp16 minimum
(the zero point) and its codes bit-packed, so ``nbytes`` is the real storage.

Code layout (contiguous, the last axis is one group and is what ``pack_codes`` packs):
  keys   ``[T // group, H, D, group]``: row (g, h, d) holds tokens g*group .. g*group+group-1
         of head h, channel d; ``scale``/``zero`` are ``[T // group, H, D]``.
  values ``[T, H, D // group, group]``: row (t, h, j) holds channels j*group .. j*group+group-1
         of token t, head h; ``scale``/``zero`` are ``[T, H, D // group]``.
Each row is ``packed_bytes(group, bits)`` bytes, so padding exists only when group*bits is not
a multiple of 8 (never for the default group of 32).

Inputs are computed in float32 and must lie within the fp16 range, since the scale and minimum
are stored as fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gemvlab.kv.quant.bitpack import pack_codes, unpack_codes

AXES = ("channel", "token")


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors would be ambiguous
class KiviPacked:
    """One quantized [T, H, D] tensor: packed codes plus fp16 scale and minimum per group."""

    codes: Tensor  # uint8, bit-packed codes (pack_codes), real storage
    scale: Tensor  # float16, one per group
    zero: Tensor  # float16, the group minimum, one per group
    shape: tuple[int, int, int]  # (T, H, D) of the original tensor
    bits: int
    group: int
    axis: str  # "channel" (keys) or "token" (values)

    def nbytes(self) -> int:
        """Exact bytes held: packed codes plus two fp16 tensors."""
        return self.codes.numel() + 2 * self.scale.numel() + 2 * self.zero.numel()


def _check(x: Tensor, bits: int, group: int, name: str) -> None:
    """Reject inputs the layout cannot represent, before any work is done."""
    if x.dim() != 3:
        raise ValueError(f"{name} must be [T, H, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")


def _quantize_rows(rows: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max quantization of each row (last axis) of a float32 tensor.

    The scale and minimum are rounded to fp16 before the codes are computed, so decoding
    with the stored values is exactly what the encoder assumed.
    """
    levels = (1 << bits) - 1
    mn = rows.amin(dim=-1)
    mx = rows.amax(dim=-1)
    scale16 = ((mx - mn) / levels).to(torch.float16)
    zero16 = mn.to(torch.float16)
    s = scale16.float().unsqueeze(-1)
    z = zero16.float().unsqueeze(-1)
    nonzero = s > 0
    q = torch.round((rows - z) / torch.where(nonzero, s, torch.ones_like(s)))
    q = torch.where(nonzero, q.clamp(0, levels), torch.zeros_like(q))
    return pack_codes(q.to(torch.uint8), bits), scale16, zero16


def quantize_keys(k: Tensor, bits: int, group: int = 32) -> KiviPacked:
    """Keys [T, H, D] per channel: each (head, channel) in groups of ``group`` tokens."""
    _check(k, bits, group, "k")
    t, h, d = k.shape
    if t % group:
        raise ValueError(f"keys need T a multiple of group: T={t}, group={group}")
    rows = k.float().reshape(t // group, group, h, d).permute(0, 2, 3, 1).contiguous()
    codes, scale, zero = _quantize_rows(rows, bits)
    return KiviPacked(codes, scale, zero, (t, h, d), bits, group, "channel")


def quantize_values(v: Tensor, bits: int, group: int = 32) -> KiviPacked:
    """Values [T, H, D] per token: each (token, head) in groups of ``group`` channels."""
    _check(v, bits, group, "v")
    t, h, d = v.shape
    if d % group:
        raise ValueError(f"values need D a multiple of group: D={d}, group={group}")
    rows = v.float().reshape(t, h, d // group, group)
    codes, scale, zero = _quantize_rows(rows, bits)
    return KiviPacked(codes, scale, zero, (t, h, d), bits, group, "token")


def dequantize(p: KiviPacked, dtype: torch.dtype = torch.float32) -> Tensor:
    """Back to [T, H, D]: code * scale + minimum in float32, then cast to ``dtype``."""
    if p.axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {p.axis!r}")
    t, h, d = p.shape
    q = unpack_codes(p.codes, p.bits, p.group).float()
    x = q * p.scale.float().unsqueeze(-1) + p.zero.float().unsqueeze(-1)
    if p.axis == "channel":  # [T // group, H, D, group] -> [T, H, D]
        x = x.permute(0, 3, 1, 2).reshape(t, h, d)
    else:  # [T, H, D // group, group] -> [T, H, D]
        x = x.reshape(t, h, d)
    return x.to(dtype)
