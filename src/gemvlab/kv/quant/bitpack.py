"""Dense bit packing of integer codes, so a quantized cache holds exactly its bits.

Codes of ``bits`` bits each are laid end to end along the last axis (least significant bit
first) and stored as uint8; the only waste is the padding of the last byte of each row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def packed_bytes(n: int, bits: int) -> int:
    """Bytes per row of ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Integer codes [..., n] in [0, 2**bits) to uint8 [..., packed_bytes(n, bits)]."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    n = codes.shape[-1]
    shifts = torch.arange(bits, device=codes.device)
    planes = (codes.long().unsqueeze(-1) >> shifts) & 1  # [..., n, bits]
    flat = planes.flatten(-2)
    pad = packed_bytes(n, bits) * 8 - flat.shape[-1]
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    octets = flat.view(*flat.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, device=codes.device))
    return (octets * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of pack_codes: codes [..., n] (uint8 for 1-bit codes, int32 otherwise).

    Each code is read from the (at most 3) bytes it spans, never widening every bit to int64:
    at long contexts that widening alone costs more memory traffic than the attention it
    feeds."""
    span = (bits + 14) // 8  # bytes a code can touch: bit offset <= 7, plus its bits
    position = torch.arange(n, device=packed.device) * bits
    first, shift = position // 8, position % 8
    if span == 1:
        return (packed[..., first] >> shift.to(torch.uint8)) & 1
    padded = torch.nn.functional.pad(packed, (0, span - 1))
    word = padded[..., first].int()
    for k in range(1, span):
        word |= padded[..., first + k].int() << (8 * k)
    return (word >> shift.int()) & ((1 << bits) - 1)
