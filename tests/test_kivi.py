"""KIVI quantizer and the bit packer: exact match to a slow loop reference, the rounding error
bound, per-channel keys vs per-token values, exact byte accounting, degenerate groups."""

from __future__ import annotations

import math

import pytest
import torch

from gemvlab.kv.quant.bitpack import pack_codes, packed_bytes, unpack_codes
from gemvlab.kv.quant.kivi import (
    KiviPacked,
    dequantize,
    quantize_keys,
    quantize_values,
)

T, H, D, G = 64, 2, 64, 32


def _randn(*shape: int, seed: int = 0, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * std + mean


# ---------------------------------------------------------------- bit packer


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 13, 33])
def test_pack_unpack_roundtrip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (3, 2, n), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 2, math.ceil(n * bits / 8)) == (3, 2, packed_bytes(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def bits_per_element(p) -> float:
    """Storage cost in bits per original element, metadata included."""
    t, h, d = p.shape
    return 8 * p.nbytes() / (t * h * d)


def test_pack_known_bytes() -> None:
    # Least significant bit first: [1, 0, 1, 1] -> 0b1101; 3-bit [5, 6] -> 5 | 6 << 3.
    assert pack_codes(torch.tensor([1, 0, 1, 1]), 1).tolist() == [13]
    assert pack_codes(torch.tensor([5, 6]), 3).tolist() == [53]
    assert pack_codes(torch.tensor([255, 1]), 8).tolist() == [255, 1]


# ---------------------------------------------------------------- slow reference


def _ref_group(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """One group the obvious way: codes, decoded values, fp16 scale, fp16 minimum."""
    levels = 2**bits - 1
    x = x.float()
    mn, mx = x.min(), x.max()
    scale16 = ((mx - mn) / levels).half()
    zero16 = mn.half()
    s, z = scale16.float(), zero16.float()
    if s.item() > 0:
        codes = torch.clamp(torch.round((x - z) / s), 0, levels)
    else:
        codes = torch.zeros_like(x)
    return codes, codes * s + z, scale16, zero16


def _ref_keys(k: torch.Tensor, bits: int, group: int):
    t, h, d = k.shape
    codes, out = torch.empty(t, h, d), torch.empty(t, h, d)
    scale = torch.empty(t // group, h, d, dtype=torch.float16)
    zero = torch.empty_like(scale)
    for gi in range(t // group):
        sl = slice(gi * group, (gi + 1) * group)
        for hi in range(h):
            for di in range(d):
                c, x, s, z = _ref_group(k[sl, hi, di], bits)
                codes[sl, hi, di], out[sl, hi, di] = c, x
                scale[gi, hi, di], zero[gi, hi, di] = s, z
    return codes, out, scale, zero


def _ref_values(v: torch.Tensor, bits: int, group: int):
    t, h, d = v.shape
    codes, out = torch.empty(t, h, d), torch.empty(t, h, d)
    scale = torch.empty(t, h, d // group, dtype=torch.float16)
    zero = torch.empty_like(scale)
    for ti in range(t):
        for hi in range(h):
            for gi in range(d // group):
                sl = slice(gi * group, (gi + 1) * group)
                c, x, s, z = _ref_group(v[ti, hi, sl], bits)
                codes[ti, hi, sl], out[ti, hi, sl] = c, x
                scale[ti, hi, gi], zero[ti, hi, gi] = s, z
    return codes, out, scale, zero


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_keys_match_loop_reference(bits: int) -> None:
    k = _randn(T, H, D, seed=1, std=2.0, mean=0.5)
    k[:, 0, 5] *= 20  # an outlier channel, as in real keys
    p = quantize_keys(k, bits, G)
    codes, out, scale, zero = _ref_keys(k, bits, G)
    assert torch.equal(dequantize(p), out)
    assert torch.equal(p.scale, scale) and torch.equal(p.zero, zero)
    # Documented layout: [T // G, H, D, G] rows of G consecutive tokens.
    got = unpack_codes(p.codes, bits, G).permute(0, 3, 1, 2).reshape(T, H, D)
    assert torch.equal(got.float(), codes)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_values_match_loop_reference(bits: int) -> None:
    v = _randn(T, H, D, seed=2, std=1.5, mean=-0.25)
    v[7] *= 30  # an outlier token
    p = quantize_values(v, bits, G)
    codes, out, scale, zero = _ref_values(v, bits, G)
    assert torch.equal(dequantize(p), out)
    assert torch.equal(p.scale, scale) and torch.equal(p.zero, zero)
    # Documented layout: [T, H, D // G, G] rows of G consecutive channels.
    got = unpack_codes(p.codes, bits, G).reshape(T, H, D)
    assert torch.equal(got.float(), codes)


def test_codes_clamped_when_fp16_minimum_moves() -> None:
    # Near 1000 fp16 steps by 0.5, far more than these groups' ranges: 1000.2 rounds down to
    # 1000.0 (codes would run past 255) and 1000.4 up to 1000.5 (codes would go negative).
    k = torch.stack([1000.2 + torch.linspace(0, 0.1, 32), 1000.4 + torch.linspace(0, 0.1, 32)],
                    dim=-1).unsqueeze(1)  # [32, 1, 2]
    p = quantize_keys(k, 8, 32)
    assert p.zero.tolist() == [[[1000.0, 1000.5]]]
    codes, out, _, _ = _ref_keys(k, 8, 32)
    assert torch.equal(dequantize(p), out)
    assert codes[:, 0, 0].max() == 255 and codes[:, 0, 1].max() == 0


# ---------------------------------------------------------------- error bound


def _bound(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> torch.Tensor:
    """Half a step, plus what fp16 rounding of the minimum and the scale can move the ends."""
    scale16 = ((mx - mn) / (2**bits - 1)).half().float()
    return scale16 / 2 + 2.0**-10 * (mn.abs() + mx.abs()) + 1e-6


@pytest.mark.parametrize("bits", range(1, 9))
def test_error_bound_keys(bits: int) -> None:
    k = _randn(T, H, D, seed=3, std=3.0, mean=1.0)
    err = (dequantize(quantize_keys(k, bits, G)) - k).abs()
    groups = k.reshape(T // G, G, H, D)
    bound = _bound(groups.amin(1), groups.amax(1), bits).repeat_interleave(G, dim=0)
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("bits", range(1, 9))
def test_error_bound_values(bits: int) -> None:
    v = _randn(T, H, D, seed=4, std=3.0, mean=-1.0)
    err = (dequantize(quantize_values(v, bits, G)) - v).abs()
    groups = v.reshape(T, H, D // G, G)
    bound = _bound(groups.amin(-1), groups.amax(-1), bits).repeat_interleave(G, dim=-1)
    assert bool((err <= bound).all()), float((err - bound).max())


# ---------------------------------------------------------------- grouping axis


def test_key_outlier_stays_in_its_channel_group() -> None:
    k = _randn(T, H, D, seed=5)
    t0, h0, d0 = 40, 1, 7
    spiked = k.clone()
    spiked[t0, h0, d0] = 50.0
    changed = dequantize(quantize_keys(spiked, 2, G)) != dequantize(quantize_keys(k, 2, G))
    allowed = torch.zeros(T, H, D, dtype=torch.bool)
    allowed[32:64, h0, d0] = True  # the token group of t0, that channel only
    assert not bool((changed & ~allowed).any())
    assert int(changed[allowed].sum()) > G // 2  # the group's range really moved


def test_value_outlier_stays_in_its_token_group() -> None:
    v = _randn(T, H, D, seed=6)
    t0, h0, d0 = 10, 0, 40
    spiked = v.clone()
    spiked[t0, h0, d0] = 50.0
    changed = dequantize(quantize_values(spiked, 2, G)) != dequantize(quantize_values(v, 2, G))
    allowed = torch.zeros(T, H, D, dtype=torch.bool)
    allowed[t0, h0, 32:64] = True  # that token and head, the channel group of d0 only
    assert not bool((changed & ~allowed).any())
    assert int(changed[allowed].sum()) > G // 2


# ---------------------------------------------------------------- byte accounting


def test_nbytes_default_layout() -> None:
    x = _randn(T, H, D, seed=7)
    pk, pv = quantize_keys(x, 2, G), quantize_values(x, 2, G)
    for p, groups, axis in [(pk, (64 // 32) * 2 * 64, "channel"), (pv, 64 * 2 * (64 // 32),
                                                                   "token")]:
        assert isinstance(p, KiviPacked) and p.axis == axis
        assert (p.shape, p.bits, p.group) == ((T, H, D), 2, G)
        assert p.codes.dtype == torch.uint8
        assert p.scale.dtype == p.zero.dtype == torch.float16
        assert p.codes.numel() == 64 * 2 * 64 * 2 // 8 == 2048
        assert p.scale.numel() == p.zero.numel() == groups == 256
        assert p.nbytes() == 2048 + 2 * 256 + 2 * 256 == 3072
        assert bits_per_element(p) == 8 * 3072 / (64 * 2 * 64) == 3.0


def test_nbytes_padded_rows() -> None:
    # 5 codes of 3 bits = 15 bits per row, padded to 2 bytes.
    t, h, d, bits, group = 10, 2, 3, 3, 5
    x = _randn(t, h, d, seed=8)
    pk = quantize_keys(x, bits, group)
    rows = (t // group) * h * d
    assert pk.codes.numel() == rows * math.ceil(group * bits / 8) == 24
    assert pk.nbytes() == 24 + 2 * rows + 2 * rows == 72
    pv = quantize_values(_randn(2, 2, 10, seed=9), bits, group)
    rows = 2 * 2 * (10 // group)
    assert pv.codes.numel() == rows * 2 and pv.nbytes() == rows * (2 + 4)
    assert torch.allclose(dequantize(pk), x, atol=float(pk.scale.float().max()))


# ---------------------------------------------------------------- quality, degenerate groups


@pytest.mark.parametrize("quantize", [quantize_keys, quantize_values])
def test_mse_decreases_with_bits(quantize) -> None:
    x = _randn(T, H, D, seed=10)
    mse = [float(((dequantize(quantize(x, b, G)) - x) ** 2).mean()) for b in (1, 2, 4)]
    assert mse[0] > mse[1] > mse[2] > 0


@pytest.mark.parametrize("quantize", [quantize_keys, quantize_values])
def test_constant_groups(quantize) -> None:
    for c in (-0.75, 0.0, 1.25):  # fp16-exact: must decode exactly
        x = torch.full((T, H, D), c)
        p = quantize(x, 2, G)
        assert torch.equal(p.scale, torch.zeros_like(p.scale))
        assert torch.equal(dequantize(p), x)
        assert not bool(unpack_codes(p.codes, 2, G).any())
    for c in (0.1, 2049.0):  # not fp16-exact: decode to their fp16 rounding, codes stay 0
        x = torch.full((T, H, D), c)
        p = quantize(x, 4, G)
        assert not bool(unpack_codes(p.codes, 4, G).any())  # 2049 - 2048 would round to 1
        assert torch.equal(dequantize(p), x.half().float())


def test_constant_group_among_others() -> None:
    k = _randn(T, H, D, seed=11)
    k[0:32, 0, 3] = 1.25
    v = _randn(T, H, D, seed=12)
    v[5, 1, 32:64] = -2.5
    dk, dv = dequantize(quantize_keys(k, 1, G)), dequantize(quantize_values(v, 1, G))
    assert bool(torch.isfinite(dk).all()) and bool(torch.isfinite(dv).all())
    assert torch.equal(dk[0:32, 0, 3], k[0:32, 0, 3])
    assert torch.equal(dv[5, 1, 32:64], v[5, 1, 32:64])


# ---------------------------------------------------------------- validation, dtypes, devices


def test_keys_need_token_multiple() -> None:
    with pytest.raises(ValueError, match="multiple of group"):
        quantize_keys(torch.zeros(48, H, D), 2, 32)


def test_values_need_channel_multiple() -> None:
    with pytest.raises(ValueError, match="multiple of group"):
        quantize_values(torch.zeros(T, H, 48), 2, 32)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_keys(torch.zeros(T, H, D), bits, G)


def test_half_inputs_and_output_dtype() -> None:
    x = _randn(T, H, D, seed=13)
    for dtype in (torch.float16, torch.bfloat16):
        p = quantize_values(x.to(dtype), 4, G)
        assert torch.equal(dequantize(p), dequantize(quantize_values(x.to(dtype).float(), 4, G)))
        assert dequantize(p, dtype).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = _randn(T, H, D, seed=14, std=2.0)
    for quantize in (quantize_keys, quantize_values):
        a, b = quantize(x, 3, G), quantize(x.cuda(), 3, G)
        assert b.codes.is_cuda and dequantize(b).is_cuda
        for name in ("codes", "scale", "zero"):
            assert torch.equal(getattr(a, name), getattr(b, name).cpu()), name
        assert torch.equal(dequantize(a), dequantize(b).cpu())
