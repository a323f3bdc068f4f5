"""Per-layer, per-token decode latency of CommVQ attention: decode-then-attend (naive) against
attention in codebook space (commutative), the comparison of arXiv 2506.18879's latency table.

Random codes and codebooks of the paper's shapes: latency does not depend on their values. Both
implementations run on the same layer and query, alternating call by call (and which goes first
rotates from one context to the next) so that drift in clocks or caches hits both alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from gemvlab.bench.timing import Stopwatch, spread
from gemvlab.kv.quant.commvq_attention import (
    CompressedLayer,
    commutative_attention,
    naive_attention,
    random_layer,
)

IMPLS: dict[str, Callable[..., torch.Tensor]] = {"naive": naive_attention,
                                                 "commutative": commutative_attention}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(layer: CompressedLayer, q: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
             order: Sequence[str], repeats: int, warmup: int,
             device: torch.device) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Times and output per impl; an impl that runs out of memory is left out of both."""
    calls = {name: partial(IMPLS[name], q, layer, inv_freq, scaling) for name in order}
    outputs: dict[str, torch.Tensor] = {}
    for name in order:
        try:
            outputs[name] = calls[name]()
            for _ in range(warmup - 1):
                calls[name]()
        except torch.OutOfMemoryError:
            outputs.pop(name, None)
            _free(device)
    times: dict[str, list[float]] = {name: [] for name in order if name in outputs}
    for _ in range(repeats):
        for name in list(times):
            try:
                with Stopwatch(device) as watch:
                    calls[name]()
                times[name].append(watch.seconds * 1e3)
            except torch.OutOfMemoryError:
                del times[name], outputs[name]
                _free(device)
    return times, outputs


@torch.inference_mode()
def decode_speed(contexts: Sequence[int], settings: Sequence[Mapping[str, Any]], heads: int,
                 q_heads: int, head_dim: int, window: int, rope_base: float, repeats: int,
                 warmup: int, device: str, dtype: torch.dtype, seed: int,
                 on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, float]:
    """Flat metrics per setting ``name`` (with ``stages``, ``levels``, ``rows``) and context T:
    ``speed/<impl>/<name>/<T>/{median_ms,p10_ms,p90_ms,oom}``,
    ``ratio/<name>/<T>/naive_over_commutative`` (medians of the same run),
    ``bytes/<name>/<T>/kv_bytes_per_token`` (layer bytes over T + window) and
    ``check/<name>/<T>/max_rel_diff`` (max |naive - commutative| over max |naive|: the two
    must compute the same thing for the timing to mean anything). One output is always
    computed, so ``warmup`` below 1 counts as 1. An impl that runs out of memory gets
    ``oom`` = 1 and no timings."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    inv_freq = rope_base ** (-torch.arange(0, head_dim, 2, device=dev).float() / head_dim)
    scaling = head_dim ** -0.5
    names = list(IMPLS)
    metrics: dict[str, float] = {}
    for index, context in enumerate(contexts):
        turn = index % len(names)
        order = [*names[turn:], *names[:turn]]
        for setting in settings:
            name = setting["name"]
            key = f"{name}/{context}"
            row: dict[str, Any] = {"name": name, "context": context, "order": order}
            try:
                layer = random_layer(context, heads, head_dim, setting["stages"],
                                     setting["levels"], setting["rows"], window, dev, dtype, gen)
                q = torch.randn(q_heads, head_dim, generator=gen, device=dev)
                times, outputs = _measure(layer, q, inv_freq, scaling, order, repeats,
                                          max(warmup, 1), dev)
            except torch.OutOfMemoryError:
                layer, times, outputs = None, {}, {}
                _free(dev)
            found: dict[str, float] = {}
            for impl in names:
                found[f"speed/{impl}/{key}/oom"] = float(impl not in times)
                if impl in times:
                    median, p10, p90 = spread(times[impl])
                    found[f"speed/{impl}/{key}/median_ms"] = median
                    found[f"speed/{impl}/{key}/p10_ms"] = p10
                    found[f"speed/{impl}/{key}/p90_ms"] = p90
            if len(times) == len(names):
                found[f"ratio/{key}/naive_over_commutative"] = (
                    found[f"speed/naive/{key}/median_ms"]
                    / found[f"speed/commutative/{key}/median_ms"])
            if len(outputs) == len(names):
                reference = outputs["naive"]
                found[f"check/{key}/max_rel_diff"] = (
                    (reference - outputs["commutative"]).abs().max()
                    / reference.abs().max()).item()
            if layer is not None:
                found[f"bytes/{key}/kv_bytes_per_token"] = layer.nbytes() / (context + window)
            del layer, outputs
            _free(dev)
            metrics.update(found)
            if on_row is not None:
                on_row({**row, **found})
    return metrics
