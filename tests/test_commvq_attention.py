"""CommVQ decode attention: codebook-space attention equals decode-then-attend, which equals
an independent loop-and-Hugging-Face-RoPE reference; the RoPE commutation it rests on; the
byte count; and the speed runner's metrics at tiny shapes."""

from __future__ import annotations

import math

import pytest
import torch

from gemvlab.kv.quant.bitpack import packed_bytes, unpack_codes
from gemvlab.kv.quant.commvq_attention import (
    CompressedLayer,
    commutative_attention,
    naive_attention,
    random_layer,
)
from gemvlab.kv.quant.commvq_speed import decode_speed

H, HQ, D, R, L, N, T, W = 2, 4, 16, 3, 8, 24, 37, 5
BASE = 10000.0


def _inv_freq(d: int = D) -> torch.Tensor:
    return BASE ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)


def _case(window: int, seed: int = 0) -> tuple[CompressedLayer, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layer = random_layer(T, H, D, R, L, N, window, "cpu", torch.float32, gen)
    return layer, torch.randn(HQ, D, generator=gen)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _reference(q: torch.Tensor, layer: CompressedLayer, scaling: float) -> torch.Tensor:
    """Decode by explicit loops with bitpack's own unpacker, HF Llama RoPE, torch softmax."""
    t, h, d, g = layer.tokens, layer.heads, layer.head_dim, layer.head_dim // 2
    codes = unpack_codes(layer.key_packed, int(math.log2(layer.levels)), h * layer.stages * 2)
    codes = codes.view(t, h, layer.stages, 2)
    bits = unpack_codes(layer.value_packed, 1, layer.rows).float()
    keys = torch.zeros(t, h, d)
    values = torch.zeros(t, h, d)
    for i in range(t):
        for j in range(h):
            z = torch.zeros(g, dtype=torch.complex64)
            for r in range(layer.stages):
                a, b = codes[i, j, r].tolist()
                z = z + layer.theta[j, r, a] + 1j * layer.theta[j, r, b]
            z = z * float(layer.key_scale[i])
            keys[i, j] = torch.cat([z.real, z.imag])
        row = torch.zeros(h * d)
        for n in range(layer.rows):
            if bits[i, n]:
                row += layer.codebook[n]
        values[i] = (row * float(layer.value_scale[i])).view(h, d)
    freqs = torch.arange(t, dtype=torch.float32)[:, None] * _inv_freq(d)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    keys = keys * cos + _rotate_half(keys) * sin
    if layer.recent_keys is not None:
        keys = torch.cat([keys, layer.recent_keys])
        values = torch.cat([values, layer.recent_values])
    out = torch.zeros(q.shape[0], d)
    for i in range(q.shape[0]):
        kv = i // (q.shape[0] // h)
        probs = torch.softmax((keys[:, kv] @ q[i]) * scaling, dim=0)
        out[i] = probs @ values[:, kv]
    return out


@pytest.mark.parametrize("window", [W, 0])
def test_commutative_equals_naive(window: int) -> None:
    layer, q = _case(window)
    naive = naive_attention(q, layer, _inv_freq(), D**-0.5)
    assert naive.shape == (HQ, D)
    for chunk_bytes in (2**30, 4 * HQ * D * 7):  # one chunk, and chunks of 7 tokens
        fast = commutative_attention(q, layer, _inv_freq(), D**-0.5, max_chunk_bytes=chunk_bytes)
        torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [W, 0])
def test_naive_equals_reference(window: int) -> None:
    layer, q = _case(window, seed=1)
    expected = _reference(q, layer, D**-0.5)
    torch.testing.assert_close(naive_attention(q, layer, _inv_freq(), D**-0.5), expected,
                               rtol=1e-4, atol=1e-5)


def test_attention_is_not_uniform() -> None:
    """The agreement tests mean something only if the scores vary across tokens."""
    layer, q = _case(W)
    out = naive_attention(q, layer, _inv_freq(), D**-0.5)
    flat = naive_attention(torch.zeros_like(q), layer, _inv_freq(), D**-0.5)
    assert (out - flat).abs().max() > 0.05


def test_rope_commutes_with_codewords() -> None:
    """Rotating a decoded complex key by e^{i t w} equals decoding with each codeword rotated:
    why keys can stay in codebook space."""
    layer, _ = _case(0)
    codes = unpack_codes(layer.key_packed, int(math.log2(L)), H * R * 2).view(T, H, R, 2)
    turn = torch.polar(torch.ones(T, D // 2), torch.arange(T)[:, None] * _inv_freq()[None, :])
    heads, stages = torch.arange(H).view(1, H, 1), torch.arange(R).view(1, 1, R)

    def decode(theta: torch.Tensor) -> torch.Tensor:  # theta [T, H, R, L, g]
        times = torch.arange(T).view(T, 1, 1)
        return (theta[times, heads, stages, codes[..., 0]]
                + 1j * theta[times, heads, stages, codes[..., 1]]).sum(2)

    plain = layer.theta.expand(T, *layer.theta.shape)
    rotated = decode(plain) * turn[:, None]
    torch.testing.assert_close(decode(plain * turn[:, None, None, None]), rotated)
    assert not torch.allclose(decode(plain), rotated)


def test_nbytes() -> None:
    bits = int(math.log2(L))
    codes_bytes = T * (packed_bytes(H * R * 2, bits) + packed_bytes(N, 1))
    layer, _ = _case(W)
    assert layer.nbytes() == codes_bytes + 2 * 2 * T + 2 * 2 * W * H * D
    layer, _ = _case(0)
    assert layer.nbytes() == codes_bytes + 2 * 2 * T


def test_decode_speed_tiny() -> None:
    rows: list[dict] = []
    settings = [{"name": "tiny", "stages": R, "levels": L, "rows": N}]
    metrics = decode_speed([16, 32], settings, heads=H, q_heads=HQ, head_dim=D, window=W,
                           rope_base=BASE, repeats=3, warmup=1, device="cpu",
                           dtype=torch.float32, seed=0, on_row=rows.append)
    assert [(row["name"], row["context"]) for row in rows] == [("tiny", 16), ("tiny", 32)]
    for context in (16, 32):
        for impl in ("naive", "commutative"):
            assert math.isfinite(metrics[f"speed/{impl}/tiny/{context}/median_ms"])
            assert metrics[f"speed/{impl}/tiny/{context}/oom"] == 0
            assert (metrics[f"speed/{impl}/tiny/{context}/p10_ms"]
                    <= metrics[f"speed/{impl}/tiny/{context}/median_ms"]
                    <= metrics[f"speed/{impl}/tiny/{context}/p90_ms"])
        assert metrics[f"ratio/tiny/{context}/naive_over_commutative"] > 0
        assert metrics[f"check/tiny/{context}/max_rel_diff"] < 1e-3
        per_token = random_layer(context, H, D, R, L, N, W, "cpu", torch.float32,
                                 torch.Generator()).nbytes() / (context + W)
        assert metrics[f"bytes/tiny/{context}/kv_bytes_per_token"] == per_token
