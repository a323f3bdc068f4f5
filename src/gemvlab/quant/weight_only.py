"""Weight-only quantized models: per-group codes in place of nn.Linear weights, calibrated layer
by layer.

Calibration is sequential, as in GPTQ: the layers of block i see inputs produced by the already
quantized blocks before it, so each layer's error is measured on what it will really receive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from gemvlab.quant.gptq import accumulate_hessian
from gemvlab.quant.groupwise import GroupQuant
from gemvlab.quant.modules import block_key, is_skipped, replace_module

# (layer name, weight [N, K], H [K, K] of its calibration inputs) -> codes
Quantizer = Callable[[str, Tensor, Tensor], GroupQuant]


class GroupLinear(nn.Module):
    """y = x W^T + b with W stored as per-group codes; dequantized on every call."""

    def __init__(self, linear: nn.Linear, quant: GroupQuant) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant = quant
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.quant.dequantize().to(device=x.device, dtype=x.dtype)
        return nn.functional.linear(x, weight, self.bias)


def _blocks(model: nn.Module, skip: Sequence[str]) -> list[list[tuple[str, nn.Linear]]]:
    """The model's nn.Linear layers grouped by transformer block (path up to layers.<i>)."""
    groups: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not is_skipped(name, skip):
            groups.setdefault(block_key(name) or name, []).append((name, mod))
    return list(groups.values())


@torch.no_grad()
def quantize_weights(model: nn.Module, batches: Sequence[Tensor], quantizer: Quantizer,
                     skip: Iterable[str] = ("lm_head",),
                     progress: Callable[[str], None] | None = None) -> dict[str, GroupQuant]:
    """Replace each linear layer (but skip) by a GroupLinear, block by block, in model order.

    For each block, the calibration token batches run through the model (earlier blocks
    already quantized) while hooks accumulate every layer's input Hessian; the block's layers
    are then quantized together. Returns the codes by layer name, for bit accounting.
    """
    skip = list(skip)
    done: dict[str, GroupQuant] = {}
    for block in _blocks(model, skip):
        hessians: dict[str, tuple[Tensor | None, int]] = {name: (None, 0) for name, _ in block}
        handles = [mod.register_forward_pre_hook(_hessian_hook(hessians, name))
                   for name, mod in block]
        try:
            for ids in batches:
                model(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
        for name, mod in block:
            h, _ = hessians[name]
            if h is None:
                raise ValueError(f"layer {name} saw no calibration input: it is not on the "
                                 "forward path; add it to skip")
            done[name] = quantizer(name, mod.weight.detach().float(), h)
            replace_module(model, name, GroupLinear(mod, done[name]))
        if progress is not None:
            progress(block[0][0])
    return done


def _hessian_hook(store: dict[str, tuple[Tensor | None, int]], name: str):
    """A forward pre-hook adding a layer's inputs to its running Hessian in store[name]."""

    def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        h, count = store[name]
        store[name] = accumulate_hessian(h, count, args[0].detach())

    return fn


def bits_per_weight(quants: dict[str, GroupQuant]) -> float:
    """Weighted over every quantized weight: codes, scales, zeros (and group indices)."""
    weights = sum(q.codes.numel() for q in quants.values())
    return sum(q.bits_per_weight() * q.codes.numel() for q in quants.values()) / weights
