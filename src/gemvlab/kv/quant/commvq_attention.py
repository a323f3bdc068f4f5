"""Decode attention over a CommVQ-compressed layer (arXiv 2506.18879), two ways.

Keys are stored before RoPE as additive codes into a codebook whose codewords are one complex
number per RoPE pair, so they commute with the rotation; values are binary codes into an
additive codebook. ``naive_attention`` decodes the cache to dense keys and values and runs
ordinary attention; ``commutative_attention`` computes the same output in codebook space, never
building a dense key or value. Both use the same unpacking and gather-sum machinery, so a speed
comparison measures the two orders of computation, not two implementations of a primitive.

Internally each stage's ``L`` key codewords are laid out as ``2L`` real rows of length ``D``
((re, im) of each pair, interleaved): row ``a`` holds codeword ``a`` as code A and row ``L + a``
holds it times ``i`` (code B), so a decoded key (or a query-times-key partial) is one
``embedding_bag`` sum over ``2R`` rows per token and head. Bags go head by head, so that
consecutive bags read one head's rows (a table that fits in cache) rather than all heads'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gemvlab.kv.quant.bitpack import pack_codes, unpack_codes


@dataclass
class CompressedLayer:
    """One layer's compressed cache: T compressed tokens at positions 0..T-1, then an optional
    full-precision recent window (keys already rotated) at positions T..T+W-1."""

    key_packed: Tensor  # uint8 [T, packed_bytes(H*R*2, log2 L)]
    key_scale: Tensor  # float16 [T]
    theta: Tensor  # complex64 [H, R, L, D/2]
    levels: int  # L
    stages: int  # R
    value_packed: Tensor  # uint8 [T, packed_bytes(N, 1)]
    value_scale: Tensor  # float16 [T]
    codebook: Tensor  # float [N, H*Dv]
    rows: int  # N
    heads: int  # H
    head_dim: int  # D
    recent_keys: Tensor | None = None  # [W, H, D], post-RoPE
    recent_values: Tensor | None = None  # [W, H, Dv]

    def nbytes(self) -> int:
        """Bytes per layer the cache holds (codebooks are shared, so not counted); the recent
        window counts as fp16 whatever its storage dtype, as the paper stores it."""
        total = (self.key_packed.numel() * self.key_packed.element_size()
                 + self.value_packed.numel() * self.value_packed.element_size()
                 + 2 * (self.key_scale.numel() + self.value_scale.numel()))
        if self.recent_keys is not None:
            total += 2 * self.recent_keys.numel()
        if self.recent_values is not None:
            total += 2 * self.recent_values.numel()
        return total

    @property
    def tokens(self) -> int:
        """Compressed tokens T (the recent window not included)."""
        return self.key_packed.shape[0]

    @property
    def key_bits(self) -> int:
        """Bits per key code, log2 L."""
        return int(math.log2(self.levels))


def random_layer(tokens: int, heads: int, head_dim: int, stages: int, levels: int, rows: int,
                 window: int, device: torch.device | str, dtype: torch.dtype,
                 generator: torch.Generator) -> CompressedLayer:
    """Random codes and codebooks of the real shapes: speed does not depend on the values.
    Scales are chosen so decoded keys and values have about unit variance, which keeps the
    softmax away from one-hot and the agreement check meaningful. Drawn on the generator's
    device, then moved to ``device``; the codebook and recent window are in ``dtype``."""
    if levels < 2 or levels & (levels - 1):
        raise ValueError(f"levels must be a power of 2, got {levels}")
    gen_device = generator.device
    bits = int(math.log2(levels))
    g = head_dim // 2

    def normal(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=gen_device)

    def scale() -> Tensor:
        return (0.5 + torch.rand(tokens, generator=generator, device=gen_device)).half()

    codes = torch.randint(0, levels, (tokens, heads * stages * 2), generator=generator,
                          device=gen_device)
    bits_v = torch.randint(0, 2, (tokens, rows), generator=generator, device=gen_device)
    theta = torch.complex(normal(heads, stages, levels, g), normal(heads, stages, levels, g))
    layer = CompressedLayer(
        key_packed=pack_codes(codes, bits), key_scale=scale(),
        theta=theta / math.sqrt(2 * stages), levels=levels, stages=stages,
        value_packed=pack_codes(bits_v, 1), value_scale=scale(),
        codebook=(normal(rows, heads * head_dim) * math.sqrt(2 / rows)).to(dtype), rows=rows,
        heads=heads, head_dim=head_dim,
        recent_keys=normal(window, heads, head_dim).to(dtype) if window else None,
        recent_values=normal(window, heads, head_dim).to(dtype) if window else None)
    return _to(layer, torch.device(device))


def _to(layer: CompressedLayer, device: torch.device) -> CompressedLayer:
    moved = {name: value.to(device) if isinstance(value, Tensor) else value
             for name, value in vars(layer).items()}
    return CompressedLayer(**moved)


def _pair_rows(theta: Tensor, factor: Tensor) -> Tensor:
    """Codebook theta [H, R, L, g] times a complex factor broadcasting to [H, R, L, *E, g], as
    real rows [H*R*2L, prod(E)*2g]: row a is codeword a as code A, row L + a is i times it (code
    B). Written in place: the commutative table is the largest per-step temporary."""
    h, r, levels = theta.shape[:3]
    shape = torch.broadcast_shapes(theta.shape, factor.shape)
    out = torch.empty(h, r, 2, *shape[2:], dtype=torch.complex64, device=theta.device)
    torch.mul(theta, factor, out=out[:, :, 0])
    torch.mul(out[:, :, 0], 1j, out=out[:, :, 1])
    return torch.view_as_real(out).view(h * r * 2 * levels, -1)


def _bags(layer: CompressedLayer, start: int, stop: int) -> Tensor:
    """Rows of ``_pair_rows`` to sum for tokens start..stop-1, head-major: [H*(stop-start), 2R]."""
    h, r, levels = layer.heads, layer.stages, layer.levels
    codes = unpack_codes(layer.key_packed[start:stop], layer.key_bits, h * r * 2)
    device = codes.device
    offset = (torch.arange(h, device=device).view(h, 1, 1) * (r * 2 * levels)
              + torch.arange(r, device=device).view(1, r, 1) * (2 * levels)
              + torch.arange(2, device=device).view(1, 1, 2) * levels)
    return (codes.view(-1, h, r, 2) + offset).transpose(0, 1).reshape(-1, 2 * r)


def _angles(start: int, stop: int, inv_freq: Tensor) -> Tensor:
    """RoPE angles [stop-start, g] in float32, as Hugging Face computes them."""
    position = torch.arange(start, stop, device=inv_freq.device, dtype=torch.float32)
    return position[:, None] * inv_freq.float()[None, :]


def _window(layer: CompressedLayer) -> int:
    return 0 if layer.recent_keys is None else layer.recent_keys.shape[0]


def naive_attention(q: Tensor, layer: CompressedLayer, inv_freq: Tensor,
                    scaling: float) -> Tensor:
    """The baseline: decode every key (unpack, sum codewords, scale, RoPE) and every value
    (unpack, times the codebook, scale) to dense tensors, then ordinary softmax attention
    over [compressed | recent]. q: [Hq, D] post-RoPE query at position T + W; returns
    [Hq, Dv] float32."""
    t, h, d = layer.tokens, layer.heads, layer.head_dim
    rows = _pair_rows(layer.theta, torch.ones((), dtype=torch.complex64, device=q.device))
    pre = torch.view_as_complex(F.embedding_bag(_bags(layer, 0, t), rows, mode="sum")
                                .view(h, t, d // 2, 2))
    angles = _angles(0, t, inv_freq)
    rope = torch.polar(layer.key_scale.float()[:, None].expand_as(angles), angles)
    z = (pre * rope).transpose(0, 1)  # [T, H, g]: scaled, rotated
    keys = torch.cat([z.real, z.imag], dim=-1)
    codebook = layer.codebook
    bits = unpack_codes(layer.value_packed, 1, layer.rows).to(codebook.dtype)
    values = (bits @ codebook) * layer.value_scale.to(codebook.dtype)[:, None]
    values = values.view(t, h, -1)
    if _window(layer):
        keys = torch.cat([keys, layer.recent_keys.float()])
        values = torch.cat([values, layer.recent_values.to(codebook.dtype)])
    qg = q.float().view(h, -1, d)
    probs = (torch.einsum("hgd,thd->hgt", qg, keys) * scaling).softmax(dim=-1)
    out = torch.einsum("hgt,thv->hgv", probs.to(values.dtype), values)
    return out.float().reshape(q.shape[0], -1)


def commutative_attention(q: Tensor, layer: CompressedLayer, inv_freq: Tensor, scaling: float,
                          max_chunk_bytes: int = 2**30) -> Tensor:
    """The same output as ``naive_attention``, in codebook space. Keys: a codeword is one
    complex number per pair, so it commutes with RoPE and
    q . R_t k_t = key_scale[t] Re sum_j e^{i t w_j} sum_r (P[r, A, j] + i P[r, B, j]) with
    P = conj(q_j) theta[h, r, a, j], a table built once per step (its size does not grow with
    T); per token only a gather-sum of P, one rotation and a sum over j. Values: the weights
    p[t] value_scale[t] meet the bits first, [Hq, T] x [T, N], then the codebook,
    [Hq, N] x [N, Dv], instead of decoding T values with [T, N] x [N, H*Dv]. Tokens go in
    chunks whose largest temporary stays under ``max_chunk_bytes``."""
    t, h, d = layer.tokens, layer.heads, layer.head_dim
    hq, g = q.shape[0], d // 2
    groups = hq // h
    qf = q.float()
    qz = torch.complex(qf[:, :g], qf[:, g:]).conj().view(h, 1, 1, groups, g)
    table = _pair_rows(layer.theta[:, :, :, None, :], qz)  # [H*R*2L, G*D]
    chunk = max(1, max_chunk_bytes // (4 * max(hq * d, layer.rows)))
    scores = []
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        partial = F.embedding_bag(_bags(layer, start, stop), table, mode="sum")
        angles = _angles(start, stop, inv_freq)
        # (cos, -sin) per pair, interleaved like the table: Re(e^{i t w} y) = rotation . y
        rotation = torch.view_as_real(torch.polar(torch.ones_like(angles), -angles)).flatten(1)
        dots = torch.einsum("htgd,td->hgt", partial.view(h, -1, groups, d), rotation)
        scores.append(dots * layer.key_scale[start:stop].float())
    qg = qf.view(h, groups, d)
    if _window(layer):
        scores.append(torch.einsum("hgd,whd->hgw", qg, layer.recent_keys.float()))
    probs = (torch.cat(scores, dim=-1) * scaling).softmax(dim=-1)
    codebook = layer.codebook
    weights = (probs[..., :t] * layer.value_scale.float()).reshape(hq, t)
    mixed = torch.zeros(hq, layer.rows, device=q.device)
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        bits = unpack_codes(layer.value_packed[start:stop], 1, layer.rows).to(codebook.dtype)
        mixed += (weights[:, start:stop].to(codebook.dtype) @ bits).float()
    out = torch.einsum("hgn,nhv->hgv", mixed.view(h, groups, -1).to(codebook.dtype),
                       codebook.view(layer.rows, h, -1)).float()
    if _window(layer):
        recent = layer.recent_values.to(codebook.dtype)
        out = out + torch.einsum("hgw,whv->hgv", probs[..., t:].to(recent.dtype), recent).float()
    return out.reshape(hq, -1)

