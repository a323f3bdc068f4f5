"""Weight-only quantization of a whole (tiny) model, calibrated block by block."""

from __future__ import annotations

import pytest
import torch

from gemvlab.quant.gptq import gptq_quantize
from gemvlab.quant.groupwise import rtn_quantize
from gemvlab.quant.weight_only import GroupLinear, bits_per_weight, quantize_weights
from tests.tiny import make_gemma3, make_llama


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


class _Exact:
    """Codes that are the weight itself: calibration then changes nothing in the model."""

    def __init__(self, w: torch.Tensor) -> None:
        self.codes = w

    def dequantize(self) -> torch.Tensor:
        return self.codes

    def bits_per_weight(self) -> float:
        return 32.0


def _tiny_gemma3() -> torch.nn.Module:
    return make_gemma3(40, ["sliding_attention", "full_attention", "sliding_attention"])


@pytest.mark.parametrize("make", [lambda: make_llama(vocab_size=40, seed=3), _tiny_gemma3])
def test_cached_block_inputs_give_the_hessians_of_a_full_forward(make):
    # Gemma 3 mixes sliding-window and full attention: each block gets its own mask, so
    # replaying one block's kwargs for all would change every second block's Hessians.
    model = make()
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 40, (2, 24), generator=gen) for _ in range(3)]
    expected: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            def hook(_m, args, name=name):
                expected.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        ref = [model(input_ids=ids).logits for ids in calib]
    for h in handles:
        h.remove()
    seen: dict[str, torch.Tensor] = {}

    def exact(name, w, h):
        seen[name] = h
        return _Exact(w)

    quantize_weights(model, calib, exact)
    assert set(seen) == set(expected)
    for name, xs in expected.items():
        x = torch.cat(xs).double()
        # Each batch product runs in float32 (hessian()), the mean over batches in float64.
        torch.testing.assert_close(seen[name], 2 / x.shape[0] * x.t() @ x, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for ids, logits in zip(calib, ref, strict=True):
            torch.testing.assert_close(model(input_ids=ids).logits, logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="calibrates a model on a CUDA GPU")
@pytest.mark.parametrize("kind", ["rtn", "gptq", "glvq"])
def test_weight_only_methods_calibrate_a_cuda_model(kind):
    from gemvlab.quant.recipes import weight_quantizer

    model = make_llama(vocab_size=40, seed=3).cuda()
    ids = torch.randint(0, 40, (2, 48), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    method = {"kind": kind, "bits": 4, "group_size": 16, "damp": 0.01, "act_order": False,
              "d": 8, "lattice": "group", "companding": "group", "rounding": "babai",
              "salience_share": 0.25, "steps": 2, "learn_rows": 256, "lr": 0.01,
              "frobenius": 0.01}
    quants = quantize_weights(model, [ids], weight_quantizer(method))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert len(quants) == 14 and out.is_cuda
    assert ((out - ref).norm() / ref.norm()).item() < 0.3
