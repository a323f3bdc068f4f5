"""KV codecs: what a quantized cache stores for a run of tokens, and how it reads them back.

A codec turns one layer's keys (after RoPE, as the cache holds them) and values for tokens at
known positions into packed codes, and back. ``Packed.nbytes`` counts every byte the cache
keeps for those tokens (codes, scales, norms), never the codebooks, which are per model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gemvlab.kv.quant import commvq, kivi
from gemvlab.kv.quant.bitpack import pack_codes, unpack_codes

# positions [T] -> complex [T, D/2]: the factor RoPE multiplies each key pair by.
Rotation = Callable[[Tensor], Tensor]


@dataclass
class Packed:
    payload: dict[str, Any]
    tokens: int
    nbytes: int


def _bytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class KiviCodec:
    """KIVI: keys per channel over groups of ``group`` tokens, values per token."""

    def __init__(self, bits: int, group: int = 32) -> None:
        self.name, self.bits, self.group = f"kivi{bits}", bits, group

    def compress(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> Packed:
        k = kivi.quantize_keys(keys, self.bits, self.group)
        v = kivi.quantize_values(values, self.bits, self.group)
        return Packed({"k": k, "v": v}, keys.shape[0], k.nbytes() + v.nbytes())

    def decompress(self, layer: int, packed: Packed, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return (kivi.dequantize(packed.payload["k"], dtype),
                kivi.dequantize(packed.payload["v"], dtype))


class CommVQCodec:
    """CommVQ: keys un-rotated to before RoPE and coded into the commutative codebook, values
    through the learned encoder; both bit-packed."""

    group = 1

    def __init__(self, bits: int, key_books: Sequence[commvq.KeyCodebook],
                 value_codecs: Sequence[commvq.ValueCodec], rotation: Rotation) -> None:
        self.name, self.bits = f"commvq{bits}", bits
        self.key_books, self.value_codecs, self.rotation = list(key_books), list(value_codecs), \
            rotation

    def compress(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor) -> Packed:
        book, codec = self.key_books[layer], self.value_codecs[layer]
        t, heads, _ = keys.shape
        pre = commvq.from_pairs(commvq.to_pairs(keys) / self.rotation(positions)[:, None])
        codes, norm = commvq.encode_keys(pre, book)
        key_bits = int(math.log2(book.levels))
        key_packed = pack_codes(codes.flatten(1), key_bits)
        bits, scale = codec.encode(values.reshape(t, -1))
        value_packed = pack_codes(bits, 1)
        payload = {"k": key_packed, "k_norm": norm, "v": value_packed, "v_scale": scale,
                   "positions": positions, "heads": heads}
        return Packed(payload, t, _bytes(key_packed, norm, value_packed, scale))

    def decompress(self, layer: int, packed: Packed, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        book, codec = self.key_books[layer], self.value_codecs[layer]
        p = packed.payload
        heads = p["heads"]
        codes = unpack_codes(p["k"], int(math.log2(book.levels)), heads * book.stages * 2)
        codes = codes.long().view(packed.tokens, heads, book.stages, 2)
        pairs = commvq.decode_key_pairs(codes, p["k_norm"], book)
        keys = commvq.from_pairs(pairs * self.rotation(p["positions"])[:, None])
        bits = unpack_codes(p["v"], 1, codec.rows)
        values = codec.decode(bits, p["v_scale"]).view(packed.tokens, heads, -1)
        return keys.to(dtype), values.to(dtype)


Codec = KiviCodec | CommVQCodec
