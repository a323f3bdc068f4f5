"""Weight-only quantized models: codes in place of nn.Linear weights, calibrated block by block.

Calibration is sequential, as in GPTQ: the layers of block i see inputs produced by the already
quantized blocks before it, so each layer's error is measured on what it will really receive.
The blocks' inputs are cached: one pass records what the model hands each block (its hidden
states and keyword arguments: masks, rotary embeddings, which differ per block in Gemma 3), then
each block runs twice on the cached states, once to collect its layers' input Hessians and once,
quantized, to produce the next block's inputs. The full model never runs again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from gemvlab.quant.gptq import accumulate_hessian
from gemvlab.quant.modules import block_key, is_skipped, replace_module


class WeightCodes(Protocol):
    """What a weight quantizer returns (GroupQuant, LatticeQuant)."""

    codes: Tensor

    def dequantize(self) -> Tensor: ...

    def bits_per_weight(self) -> float: ...


# (layer name, weight [N, K], H [K, K] of its calibration inputs) -> codes
Quantizer = Callable[[str, Tensor, Tensor], WeightCodes]


class GroupLinear(nn.Module):
    """y = x W^T + b with W decoded from codes once, when the layer is built.

    The codes stay in ``quant`` for bit accounting; decoding on every call would only repeat
    the same arithmetic (the packed decode kernels in gemvlab.kernels are what measure its cost).
    """

    def __init__(self, linear: nn.Linear, quant: WeightCodes) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant = quant
        self.register_buffer("weight", quant.dequantize().to(linear.weight.device),
                             persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def _blocks(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, list[tuple[str, nn.Linear]]]]:
    """(block path, its nn.Linear layers) in model order; every layer must be in a block."""
    groups: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not is_skipped(name, skip):
            key = block_key(name)
            if key is None:
                raise ValueError(f"layer {name} is outside the transformer blocks, which "
                                 "calibration walks: add it to the method's skip list")
            groups.setdefault(key, []).append((name, mod))
    return list(groups.items())


class _Stop(Exception):
    """Raised by the last recorder: nothing after the blocks needs to run."""


class _Recorder(nn.Module):
    """Stands in for a block during the recording pass: keeps its inputs, passes them on."""

    def __init__(self, calls: list[tuple[Tensor, dict[str, Any]]], last: bool) -> None:
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            raise ValueError("calibration expects blocks called as block(hidden, **kwargs)")
        self.calls.append((hidden, kwargs))
        if self.last:
            raise _Stop
        return hidden


def _record_block_inputs(model: nn.Module, paths: list[str], batches: Sequence[Tensor]
                         ) -> tuple[list[Tensor], list[list[dict[str, Any]]]]:
    """The first block's hidden states per batch, and every block's kwargs per batch."""
    calls: list[list[tuple[Tensor, dict[str, Any]]]] = [[] for _ in paths]
    blocks = [model.get_submodule(p) for p in paths]
    for i, path in enumerate(paths):
        replace_module(model, path, _Recorder(calls[i], last=i == len(paths) - 1))
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        for path, block in zip(paths, blocks, strict=True):
            replace_module(model, path, block)
    hidden = [h for h, _ in calls[0]]
    return hidden, [[kw for _, kw in block_calls] for block_calls in calls]


def _run_block(block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantize_weights(model: nn.Module, batches: Sequence[Tensor], quantizer: Quantizer,
                     skip: Iterable[str] = ("lm_head",),
                     progress: Callable[[str], None] | None = None) -> dict[str, WeightCodes]:
    """Replace each linear layer (but skip) by a GroupLinear, block by block, in model order.

    Returns the codes by layer name, for bit accounting.
    """
    skip = list(skip)
    blocks = _blocks(model, skip)
    paths = [path for path, _ in blocks]
    hidden, kwargs = _record_block_inputs(model, paths, batches)
    done: dict[str, WeightCodes] = {}
    for (path, layers), block_kwargs in zip(blocks, kwargs, strict=True):
        block = model.get_submodule(path)
        hessians: dict[str, tuple[Tensor | None, int]] = {name: (None, 0) for name, _ in layers}
        shared: dict[int, tuple[Tensor, Tensor, Tensor | None, int]] = {}
        handles = [mod.register_forward_pre_hook(_hessian_hook(hessians, name, shared))
                   for name, mod in layers]
        try:
            for h, kw in zip(hidden, block_kwargs, strict=True):
                _run_block(block, h, kw)
                shared.clear()
        finally:
            for handle in handles:
                handle.remove()
        for group in _quantized_together(layers, hessians, quantizer):
            names = [name for name, _ in group]
            weight = torch.cat([mod.weight.detach().float() for _, mod in group])
            codes = quantizer(",".join(names), weight, hessians[names[0]][0])
            start = 0
            for name, mod in group:
                stop = start + mod.out_features
                done[name] = codes if len(group) == 1 else codes.rows(start, stop)
                replace_module(model, name, GroupLinear(mod, done[name]))
                start = stop
        hidden = [_run_block(block, h, kw) for h, kw in zip(hidden, block_kwargs, strict=True)]
        if progress is not None:
            progress(path)
    return done


def _quantized_together(layers: list[tuple[str, nn.Linear]],
                        hessians: dict[str, tuple[Tensor | None, int]],
                        quantizer: Quantizer) -> list[list[tuple[str, nn.Linear]]]:
    """Layers in groups to quantize as one matrix: those sharing one Hessian object when the
    quantizer's rows are independent, else one layer each."""
    for name, _ in layers:
        if hessians[name][0] is None:
            raise ValueError(f"layer {name} saw no calibration input: it is not on the "
                             "forward path; add it to skip")
    if not getattr(quantizer, "rows_independent", False):
        return [[layer] for layer in layers]
    groups: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, mod in layers:
        groups.setdefault(id(hessians[name][0]), []).append((name, mod))
    return list(groups.values())


def _hessian_hook(store: dict[str, tuple[Tensor | None, int]], name: str,
                  shared: dict[int, tuple[Tensor, Tensor, Tensor | None, int]]):
    """A forward pre-hook adding a layer's inputs to its running Hessian in store[name].

    Layers fed the very same tensor (q, k and v; gate and up) share one running Hessian:
    ``shared`` maps the input's id to (input, Hessian after it), so it is computed once.
    """

    def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        seen = shared.get(id(x))
        if seen is not None and seen[0] is x and store[name][0] is seen[2]:
            store[name] = (seen[1], seen[3])
            return
        h, count = store[name]
        store[name] = accumulate_hessian(h, count, x.detach())
        shared[id(x)] = (x, store[name][0], h, store[name][1])

    return fn


def bits_per_weight(quants: dict[str, WeightCodes]) -> float:
    """Weighted over every quantized weight: codes and all their overhead."""
    weights = sum(q.codes.numel() for q in quants.values())
    return sum(q.bits_per_weight() * q.codes.numel() for q in quants.values()) / weights
