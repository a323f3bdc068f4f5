"""A 4-bit frozen base for QLoRA and QOFT: NF4 through bitsandbytes, or our own 4-bit RTN.

The adapters wrap these layers as they wrap nn.Linear (LoRA adds to their output, OFTv2
rotates their input), so QLoRA and QOFT differ only in the adapter. Our RTN layer keeps only
packed 4-bit codes and recomputes the weight for each product, in the backward pass too, as
bitsandbytes does: a decoded copy held for backward would undo the memory saving.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gemvlab.kernels.lattice_gemv import PackedRTN, pack_rtn, unpack_codes
from gemvlab.quant.groupwise import rtn_quantize
from gemvlab.quant.modules import is_skipped, replace_module

BASES = ("none", "nf4", "rtn4")


def decode_packed(p: PackedRTN, dtype: torch.dtype) -> Tensor:
    """W_hat [N, K] in dtype from packed RTN codes."""
    u = unpack_codes(p.planes, p.bits).float()
    scale = p.scale.float().repeat_interleave(p.group_size, dim=1)
    zero = p.zero.float().repeat_interleave(p.group_size, dim=1)
    return ((u - zero) * scale).to(dtype)


class _DecodedMatmul(torch.autograd.Function):
    """y = x W_hat^T for a frozen W_hat decoded on the fly; backward decodes it again."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: PackedRTNLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return x @ decode_packed(layer.packed, x.dtype).t()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad @ decode_packed(ctx.layer.packed, grad.dtype), None


class PackedRTNLinear(nn.Module):
    """A frozen nn.Linear stored as 4-bit RTN codes (per-group asymmetric, bit-plane packed)."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 64) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = pack_rtn(rtn_quantize(linear.weight.detach().float(), bits, group_size))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = _DecodedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _nf4(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features,
                              bias=linear.bias is not None, compute_dtype=linear.weight.dtype,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().to("cpu"), requires_grad=False,
                                     quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(linear.weight.device)  # moving the Params4bit quantizes them


def quantize_base(model: nn.Module, kind: str, skip: list[str],
                  group_size: int = 64) -> dict[str, float]:
    """Replace every nn.Linear but ``skip`` by a frozen 4-bit layer; returns its metrics."""
    if kind not in BASES[1:]:
        raise ValueError(f"method.base={kind} is unknown: use one of {BASES}")
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not is_skipped(n, skip)]
    weights = 0
    for name in names:
        linear = model.get_submodule(name)
        weights += linear.weight.numel()
        layer = _nf4(linear) if kind == "nf4" else PackedRTNLinear(linear, 4, group_size)
        replace_module(model, name, layer)
    return {"base_layers_4bit": len(names), "base_weights_4bit": weights}
