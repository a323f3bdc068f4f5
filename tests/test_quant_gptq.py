"""Tests of per-group RTN (quant/groupwise.py) and GPTQ (quant/gptq.py, arXiv 2210.17323).

Hand cases give codes, scales and zero points worked out in the comments; the GPTQ-vs-RTN error
ratios are measured (numbers in the comments) and asserted with margin.
"""

from __future__ import annotations

import pytest
import torch

from gemvlab.quant.gptq import accumulate_hessian, gptq_quantize, hessian
from gemvlab.quant.groupwise import GroupQuant, group_params, quantize_with, rtn_quantize


def correlated_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X [512, 128] = Z A with random A (so H = 2/T X^T X is far from diagonal), W [64, 128]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(128, 128, generator=g)
    x = torch.randn(512, 128, generator=g) @ a
    w = torch.randn(64, 128, generator=g)
    return x, w


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||_F, the layer-output error GPTQ minimizes."""
    return torch.linalg.norm(x.double() @ (w.double() - w_hat.double()).t()).item()


def test_rtn_hand_case() -> None:
    # bits 3 (codes 0..7), group [-1.5, 0.3, 1.2, 2.0]: range -1.5..2.0, scale 3.5 / 7 = 0.5
    # (exact in fp16), zero round(1.5 / 0.5) = 3; w / scale = -3, 0.6, 2.4, 4 rounds to
    # -3, 1, 2, 4, plus zero 3 gives codes 0, 4, 5, 7; (code - 3) * 0.5 = -1.5, 0.5, 1.0, 2.0.
    q = rtn_quantize(torch.tensor([[-1.5, 0.3, 1.2, 2.0]]), bits=3, group_size=4)
    assert q.scale.dtype == torch.float16 and q.scale.tolist() == [[0.5]]
    assert q.zero.tolist() == [[3]]
    assert q.codes.dtype == torch.uint8 and q.codes.tolist() == [[0, 4, 5, 7]]
    assert q.dequantize().tolist() == [[-1.5, 0.5, 1.0, 2.0]]
    assert q.perm is None


def test_dequantize_undoes_perm() -> None:
    # Groups of 2 in permuted order: scale 1 for code columns 0-1, 10 for 2-3, zero 0, so the
    # permuted values are 0, 1, 20, 30; code column j is input column perm[j] = 2, 0, 3, 1,
    # hence W_hat = [1, 30, 0, 20].
    q = GroupQuant(torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8),
                   torch.tensor([[1.0, 10.0]], dtype=torch.float16),
                   torch.zeros(1, 2, dtype=torch.uint8), bits=2, group_size=2,
                   perm=torch.tensor([2, 0, 3, 1]))
    assert q.dequantize().tolist() == [[1.0, 30.0, 0.0, 20.0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_round_trip_within_half_scale(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = 0.02 * torch.randn(16, 256, generator=g)
    w[3] = w[3].abs() + 0.01  # one-signed groups: the range must still cover them (0..max)
    q = rtn_quantize(w, bits, group_size=64)
    maxq = 2**bits - 1
    assert int(q.codes.max()) <= maxq and int(q.zero.max()) <= maxq
    scale = q.scale.float().repeat_interleave(64, dim=1)
    assert ((w - q.dequantize()).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_group_scale_rounds_up_to_fp16() -> None:
    # Group [0, 0.3] at 2 bits: exact scale 0.3 / 3 = 0.1, whose nearest fp16 is 1638 * 2^-14 =
    # 0.0999756 < 0.1; rounding up gives 1639 * 2^-14 = 0.1000366, so 3 * scale >= 0.3.
    scale, zero = group_params(torch.tensor([[0.0, 0.3]]), bits=2)
    assert scale.dtype == torch.float16 and scale.item() == 1639 * 2.0**-14
    assert zero.tolist() == [[0]]
    assert quantize_with(torch.tensor([[0.0, 0.3]]), scale, zero, 2).tolist() == [[0, 3]]


def test_bits_per_weight_rtn() -> None:
    q = rtn_quantize(torch.randn(4, 256), bits=2, group_size=128)
    assert q.bits_per_weight() == 2 + (16 + 2) / 128  # 2.140625


@pytest.mark.parametrize(("n", "k", "extra"), [
    (8, 512, 2 / 8),    # 4 groups: 2-bit group index per column, shared by 8 rows
    (4, 384, 2 / 4),    # 3 groups: ceil(log2 3) = 2 bits
    (4, 640, 3 / 4),    # 5 groups: 3 bits
    (4, 128, 0.0),      # 1 group: nothing to look up
])
def test_bits_per_weight_act_order(n: int, k: int, extra: float) -> None:
    q = GroupQuant(torch.zeros(n, k, dtype=torch.uint8),
                   torch.ones(n, k // 128, dtype=torch.float16),
                   torch.zeros(n, k // 128, dtype=torch.uint8), bits=2, group_size=128,
                   perm=torch.arange(k))
    assert q.bits_per_weight() == 2 + (16 + 2) / 128 + extra


def test_hessian_and_accumulation() -> None:
    x = torch.randn(2, 10, 6, dtype=torch.float64)  # float64 in: exact to rounding
    flat = x.reshape(20, 6)
    assert torch.allclose(hessian(x), 2 / 20 * flat.t() @ flat)
    h, count = None, 0
    for chunk in (x[0, :3], x[0, 3:], x[1]):
        h, count = accumulate_hessian(h, count, chunk)
    assert count == 20
    assert torch.allclose(h, hessian(x), rtol=1e-12, atol=1e-12)


# Measured ||X W^T - X W_hat^T||_F, GPTQ / RTN, group 32, seed 0:
#   bits 2: 0.783 (act_order 0.759); bits 3: 0.693 (0.680); bits 4: 0.693 (0.680).
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_output_error(bits: int, act_order: bool) -> None:
    x, w = correlated_layer()
    rtn = output_error(x, w, rtn_quantize(w, bits, 32).dequantize())
    gptq = output_error(x, w, gptq_quantize(w, hessian(x), bits, 32,
                                            act_order=act_order).dequantize())
    assert gptq < 0.9 * rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_result_does_not_depend_on_block_size(act_order: bool) -> None:
    # One block of K is the unbatched algorithm; blocks of 7 split groups of 32 across blocks,
    # so group parameters need the updates still pending from the current block.
    x, w = correlated_layer(seed=1)
    h = hessian(x)
    whole = gptq_quantize(w, h, 3, 32, act_order=act_order, block_size=128)
    for block in (7, 32):
        lazy = gptq_quantize(w, h, 3, 32, act_order=act_order, block_size=block)
        assert torch.equal(lazy.codes, whole.codes)
        assert torch.equal(lazy.scale, whole.scale) and torch.equal(lazy.zero, whole.zero)


def test_gptq_with_diagonal_hessian_is_rtn() -> None:
    # A diagonal H has a diagonal Cholesky factor of H^-1: no error reaches other columns,
    # and each group's parameters come from the untouched weights, exactly as in RTN.
    _, w = correlated_layer()
    rtn = rtn_quantize(w, 3, 32)
    for h in (torch.eye(128), torch.diag(torch.rand(128) + 0.5)):
        q = gptq_quantize(w, h, 3, 32)
        assert q.perm is None
        assert torch.equal(q.codes, rtn.codes)
        assert torch.equal(q.scale, rtn.scale) and torch.equal(q.zero, rtn.zero)
    # With act-order the tied diagonal keeps the identity order (stable sort).
    q = gptq_quantize(w, torch.eye(128), 3, 32, act_order=True)
    assert torch.equal(q.perm, torch.arange(128))
    assert torch.equal(q.dequantize(), rtn.dequantize())


def test_gptq_act_order_and_dead_columns() -> None:
    x, w = correlated_layer()
    x[:, 5] = 0.0  # input 5 never fires: H_55 = 0
    h = hessian(x)
    q = gptq_quantize(w, h, 3, 32, act_order=True)
    diag = h.diagonal()[q.perm]
    assert (diag[:-1] >= diag[1:]).all()
    assert sorted(q.perm.tolist()) == list(range(128))
    w_hat = q.dequantize()
    assert torch.isfinite(w_hat).all()
    assert (w_hat[:, 5] == 0).all()


def test_shape_and_argument_errors() -> None:
    w = torch.randn(4, 100)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(w, 3, 32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, torch.eye(100), 3, 32)
    with pytest.raises(ValueError, match="group_size"):
        GroupQuant(torch.zeros(4, 100, dtype=torch.uint8), torch.ones(4, 3), torch.zeros(4, 3),
                   bits=3, group_size=32)
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(w, 9, 50)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, torch.eye(99), 3, 50)
