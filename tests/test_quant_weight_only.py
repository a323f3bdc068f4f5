"""Weight-only quantization of a whole (tiny) model, calibrated block by block."""

from __future__ import annotations

import pytest
import torch

from gemvlab.quant.gptq import gptq_quantize
from gemvlab.quant.groupwise import rtn_quantize
from gemvlab.quant.weight_only import GroupLinear, bits_per_weight, quantize_weights
from tests.tiny import make_llama


def _logits_error(bits: int, quantizer) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = make_llama(vocab_size=40, seed=3)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 40, (2, 48), generator=gen) for _ in range(4)]
    held_out = torch.randint(0, 40, (2, 48), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=held_out).logits
    quants = quantize_weights(model, calib, quantizer)
    with torch.no_grad():
        out = model(input_ids=held_out).logits
    return ((out - ref).norm() / ref.norm()).item(), quants


def test_every_block_linear_is_replaced_and_bits_are_counted():
    err, quants = _logits_error(4, lambda _n, w, _h: rtn_quantize(w, 4, 16))
    # 2 layers x 7 linears (q, k, v, o, gate, up, down); the output head stays in float.
    assert len(quants) == 14 and not any("lm_head" in name for name in quants)
    assert bits_per_weight(quants) == pytest.approx(4 + (16 + 4) / 16)
    assert err < 0.2


def test_gptq_beats_rtn_on_the_whole_model_at_low_bits():
    # Measured: at 2 bits GPTQ's logit error is about 0.7x RTN's, at 3 bits about 0.75x.
    for bits in (2, 3):
        rtn, _ = _logits_error(bits, lambda _n, w, _h, b=bits: rtn_quantize(w, b, 16))
        gptq, _ = _logits_error(bits, lambda _n, w, h, b=bits: gptq_quantize(w, h, b, 16))
        assert gptq < 0.9 * rtn, (bits, gptq, rtn)


def test_group_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    quant = rtn_quantize(linear.weight.detach(), 3, 16)
    layer = GroupLinear(linear, quant)
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ quant.dequantize().t() + linear.bias)
