"""The weight-only methods a method config can name (method.kind rtn, gptq, glvq), as
quantizers for weight_only.quantize_weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from gemvlab.quant.glvq import GLVQConfig, glvq_quantize
from gemvlab.quant.gptq import gptq_quantize
from gemvlab.quant.groupwise import GroupQuant, rtn_quantize
from gemvlab.quant.weight_only import Quantizer

WEIGHT_ONLY = ("rtn", "gptq", "glvq")
_GLVQ_KEYS = ("bits", "d", "group_size", "lattice", "companding", "rounding", "salience_share",
              "steps", "learn_rows", "lr", "frobenius", "damp")


class _RowwiseQuantizer:
    """A quantizer whose rows are independent given H (RTN, GPTQ): layers fed the same inputs
    (q, k, v; gate, up) are quantized as one matrix, which is exact and saves the per-column
    loop of all but one of them."""

    rows_independent = True

    def __init__(self, fn: Callable[[Tensor, Tensor], GroupQuant]) -> None:
        self.fn = fn

    def __call__(self, _name: str, w: Tensor, h: Tensor) -> GroupQuant:
        return self.fn(w, h)


def weight_quantizer(method: Mapping[str, Any]) -> Quantizer:
    """The (name, W, H) -> codes function of a weight-only method config."""
    kind = method["kind"]
    bits, group = int(method["bits"]), int(method["group_size"])
    if kind == "rtn":
        return _RowwiseQuantizer(lambda w, _h: rtn_quantize(w, bits, group))
    if kind == "gptq":
        damp, act_order = float(method["damp"]), bool(method["act_order"])
        return _RowwiseQuantizer(lambda w, h: gptq_quantize(w, h, bits, group, damp=damp,
                                                            act_order=act_order))
    if kind == "glvq":
        cfg = GLVQConfig(**{key: type(getattr(GLVQConfig, key))(method[key])
                            for key in _GLVQ_KEYS})
        return lambda _name, w, h: glvq_quantize(w, h, cfg)
    raise ValueError(f"method.kind={kind} is not a weight-only method: use one of {WEIGHT_ONLY}")
