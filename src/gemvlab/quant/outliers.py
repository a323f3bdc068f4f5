"""Outlier features (LLM.int8() Section 4): hidden dims with large magnitude across layers.

The paper calls a hidden dim an outlier feature when its magnitude reaches 6.0 in at least 25%
of the layers and at least 6% of the sequence positions. It looks at the inputs of the attention
projections and the first feed-forward layer; here those are the post-norm residual-stream
inputs of each layer (the attention projections' and the feed-forward expansion's), whose dims
mean the same thing in every layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gemvlab.quant.modules import block_key


@dataclass(frozen=True)
class OutlierReport:
    dims: list[int]              # the outlier features (hidden dims meeting both criteria)
    hidden: int
    layers: int
    positions: int
    layer_share: float           # share of layers where some outlier feature reaches threshold
    position_share: float        # share of positions where some outlier feature does
    per_layer: list[list[int]]   # every dim reaching threshold anywhere, per layer


def outlier_report(hits: Tensor, min_layer_share: float = 0.25,
                   min_position_share: float = 0.06) -> OutlierReport:
    """hits [layers, positions, hidden] bool: |x| >= threshold at that layer input and position.

    A dim's layer share is the share of layers where it reaches the threshold at any position;
    its position share is the share of all sequence positions across all layers' hidden states
    (layer, position pairs) where it does, as the paper words it. The report's own shares say
    how many layers, and how many positions in any layer, some chosen dim reaches.
    """
    layers, positions, hidden = hits.shape
    in_layer = hits.any(dim=1)                          # [layers, hidden]
    at_position = hits.any(dim=0)                       # [positions, hidden]
    dim_layer_share = in_layer.float().mean(dim=0)      # [hidden]
    dim_position_share = hits.float().mean(dim=(0, 1))
    chosen = (dim_layer_share >= min_layer_share) & (dim_position_share >= min_position_share)
    dims = torch.nonzero(chosen).flatten().tolist()
    layer_share = in_layer[:, chosen].any(dim=1).float().mean().item() if dims else 0.0
    position_share = at_position[:, chosen].any(dim=1).float().mean().item() if dims else 0.0
    per_layer = [torch.nonzero(row).flatten().tolist() for row in in_layer]
    return OutlierReport(dims, hidden, layers, positions, layer_share, position_share, per_layer)


@torch.no_grad()
def collect_hits(model: nn.Module, batches: Iterable[Tensor], suffixes: Sequence[str],
                 threshold: float) -> tuple[Tensor, float]:
    """Run the model over token batches and record where watched inputs reach the threshold.

    Each layer block contributes the union of its watched inputs (attention and feed-forward),
    so the hits are [layers, positions, hidden], one row per transformer layer; also returns
    the largest magnitude any watched input reached.
    """
    blocks = _blocks(model, suffixes)
    if not blocks:
        raise ValueError(f"no modules named {list(suffixes)} in the model: set "
                         "outliers.modules to its attention/feed-forward input projections")
    found: dict[int, list[Tensor]] = {i: [] for i in range(len(blocks))}
    current: dict[int, Tensor] = {}
    largest = [0.0]

    def hook(index: int):
        def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            size = args[0].detach().abs()
            largest[0] = max(largest[0], float(size.max()))
            hit = (size >= threshold).reshape(-1, size.shape[-1]).cpu()
            current[index] = current[index] | hit if index in current else hit
        return fn

    handles = [mod.register_forward_pre_hook(hook(i)) for i, mods in enumerate(blocks)
               for mod in mods]
    try:
        for ids in batches:
            current.clear()
            model(input_ids=ids)
            for i in range(len(blocks)):
                found[i].append(current[i])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([torch.cat(found[i]) for i in range(len(blocks))]), largest[0]


def _blocks(model: nn.Module, suffixes: Sequence[str]) -> list[list[nn.Module]]:
    """Watched modules grouped by layer: the path up to its first numeric part (layers.3)."""
    groups: dict[str, list[nn.Module]] = {}
    for name, mod in model.named_modules():
        block = block_key(name)
        if block is not None and name.rpartition(".")[2] in suffixes:
            groups.setdefault(block, []).append(mod)
    return list(groups.values())
