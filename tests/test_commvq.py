"""CommVQ's codecs: the key codebook commutes with RoPE, EM descends, values train, bits add up."""

from __future__ import annotations

import math

import torch

from gemvlab.kv.quant import commvq


def decode_keys(codes, norm, book):
    """Keys from their codes (the pairs back to vectors): the test's view of a decoded cache."""
    return commvq.from_pairs(commvq.decode_key_pairs(codes, norm, book))


def key_bits_per_token(heads: int, stages: int, levels: int) -> int:
    """The paper's key budget per token and layer: 2 log2(L) bits per stage and head, plus a
    fp16 norm (what the packed cache must hold, no more)."""
    return heads * stages * 2 * int(math.log2(levels)) + 16


def value_bits_per_token(features: int, bits: int) -> int:
    """The paper's value budget per token and layer: the code bits and a fp16 scale."""
    return features * bits + 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _keys(n: int = 512, heads: int = 2, dim: int = 8, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    base = torch.randn(n, heads, dim, generator=g) * torch.linspace(0.3, 2.0, dim)
    return base + 0.2 * torch.randn(4, heads, dim, generator=g)[torch.randint(0, 4, (n,),
                                                                              generator=g)]


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Hugging Face's formula: x cos + rotate_half(x) sin."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2).float() / d)
    freqs = positions[:, None].float() * inv
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * emb.cos() + half * emb.sin()


def test_rotating_a_decoded_key_equals_decoding_with_rotated_codewords():
    keys = _keys(64, dim=8)
    book, _ = commvq.train_key_codebook(keys, stages=2, levels=4, iters=2,
                                        temperatures=(0.0, 0.0), seed=0)
    codes, norm = commvq.encode_keys(keys, book)
    positions = torch.arange(64) * 7
    rotated_decoded = _rope(decode_keys(codes, norm, book), positions)
    # Rotate every codeword theta_A and theta_B per position, then decode with the same codes.
    inv = 10000.0 ** (-torch.arange(0, 8, 2).float() / 8)
    turn = torch.polar(torch.ones(64, 4), positions[:, None].float() * inv)  # [T, g]
    out = []
    for t in range(64):
        rotated = commvq.KeyCodebook(book.theta * turn[t])
        out.append(decode_keys(codes[t:t + 1], norm[t:t + 1], rotated))
    torch.testing.assert_close(torch.cat(out), rotated_decoded, rtol=1e-5, atol=1e-5)
    # An unstructured codebook (independent real codewords) would not commute:
    a = torch.randn(2, 8)
    assert not torch.allclose(_rope(a[None, None, 0] + a[None, None, 1], positions[1:2]),
                              _rope(a[None, None, 0], positions[1:2]) + a[None, None, 1])


def test_nearest_codes_is_the_exact_argmin_over_all_pairs():
    x = commvq.normalize_keys(_keys(50))[0]
    theta = torch.randn(2, 8, 4, dtype=torch.complex64, generator=_gen(1)) * 0.3
    codes = commvq.nearest_codes(x, theta)
    for n in range(0, 50, 7):
        for h in range(2):
            grid = theta[h][:, None] + 1j * theta[h][None, :]  # [A, B, g]
            d = ((x[n, h] - grid).abs() ** 2).sum(-1)
            a, b = divmod(int(d.argmin()), 8)
            assert (int(codes[n, h, 0]), int(codes[n, h, 1])) == (a, b)


def test_hard_em_lowers_the_reconstruction_error_every_iteration():
    x = commvq.normalize_keys(_keys(600, seed=2))[0]
    _, history = commvq.fit_stage(x, levels=8, iters=8, temperatures=(0.0, 0.0),
                                  generator=_gen(0))
    assert all(b < a for a, b in zip(history, history[1:], strict=False)), history
    assert history[-1] < 0.7 * history[0]


def test_the_m_step_is_the_least_squares_optimum_of_the_structured_codebook():
    x = commvq.normalize_keys(_keys(200, heads=1, dim=4, seed=3))[0]
    levels = 3
    codes = torch.randint(0, levels, (200, 1, 2), generator=_gen(4))
    w_a = torch.nn.functional.one_hot(codes[..., 0], levels).float()
    w_b = torch.nn.functional.one_hot(codes[..., 1], levels).float()
    counts = torch.zeros(1, levels, levels, dtype=torch.float64)
    for a, b in codes[:, 0].tolist():
        counts[0, a, b] += 1
    theta = commvq._m_step(x, w_a, w_b, counts)
    # Independent check: real least squares over (Re theta, Im theta) with a design matrix.
    rows, target = [], []
    for n in range(200):
        a, b = codes[n, 0].tolist()
        for j in range(2):
            # real part: Re th_a - Im th_b ; imag part: Im th_a + Re th_b
            re = torch.zeros(2 * levels * 2)
            im = torch.zeros(2 * levels * 2)
            re[(a * 2 + j) * 2] += 1
            re[(b * 2 + j) * 2 + 1] -= 1
            im[(a * 2 + j) * 2 + 1] += 1
            im[(b * 2 + j) * 2] += 1
            rows += [re, im]
            target += [x[n, 0, j].real, x[n, 0, j].imag]
    sol = torch.linalg.lstsq(torch.stack(rows).double(),
                             torch.stack(target).double()[:, None]).solution[:, 0]
    ref = torch.complex(sol[0::2], sol[1::2]).view(levels, 2)
    torch.testing.assert_close(theta[0].to(torch.complex128), ref, rtol=1e-4, atol=1e-5)


def test_more_stages_reconstruct_better_and_a_prefix_is_a_codebook():
    keys = _keys(400, seed=5)
    book, _ = commvq.train_key_codebook(keys, stages=4, levels=8, iters=4,
                                        temperatures=(0.0, 0.0), seed=0)
    errors = []
    for r in (1, 2, 4):
        sub = book.prefix(r)
        codes, norm = commvq.encode_keys(keys, sub)
        errors.append(float(((decode_keys(codes, norm, sub) - keys) ** 2).mean()))
    assert errors[0] > errors[1] > errors[2]


def test_soft_em_runs_and_anneals_to_a_codebook_as_good_as_hard():
    x = commvq.normalize_keys(_keys(400, seed=6))[0]
    _, hard = commvq.fit_stage(x, 8, 6, (0.0, 0.0), _gen(0))
    _, soft = commvq.fit_stage(x, 8, 6, (0.05, 1e-4), _gen(0))
    assert soft[-1] < soft[0] and soft[-1] < 1.1 * hard[-1]


def test_key_stages_follow_the_papers_configs():
    assert commvq.key_stages(2, 128, 64) == 21
    assert commvq.key_stages(1, 128, 64) == 11
    assert commvq.key_stages(2, 64, 16) == 16


def test_value_codec_trains_and_its_bits_select_codebook_rows():
    g = _gen(7)
    basis = torch.randn(6, 16, generator=g)
    values = torch.randn(800, 6, generator=g) @ basis + 0.05 * torch.randn(800, 16, generator=g)
    untrained = commvq.ValueCodec(16, 2)
    codec = commvq.train_value_codecs([values], bits=2, steps=300, batch=128, lr=3e-3, tau=1.0,
                                      seed=0)[0]
    bits, scale = codec.encode(values)
    assert bits.shape == (800, 32) and set(bits.unique().tolist()) <= {0, 1}
    decoded = codec.decode(bits, scale)
    torch.testing.assert_close(decoded, (bits.float() @ codec.codebook) * scale.float()[:, None])
    # Norms restored up to fp16; error well under an untrained codec's.
    torch.testing.assert_close(decoded.norm(dim=-1), values.norm(dim=-1), rtol=2e-3, atol=1e-3)
    before = untrained.decode(*untrained.encode(values))
    assert ((decoded - values) ** 2).mean() < 0.5 * ((before - values) ** 2).mean()


def test_bits_per_token_at_the_papers_shape_give_87_5_percent():
    heads, dim = 8, 128
    kbits = key_bits_per_token(heads, commvq.key_stages(2, dim, 64), 64)
    vbits = value_bits_per_token(heads * dim, 2)
    fp16 = 2 * heads * dim * 16
    assert kbits == 8 * 21 * 12 + 16 and vbits == 2048 + 16
    assert math.isclose(1 - (kbits + vbits) / fp16, 0.875)
