"""Time the operators of one batched LLM decode step on one device, with random weights.

Why: a simulator's GPU model (the GPU-only baseline of the NeuPIMs reproduction) is calibrated
against these measurements, so each operator is timed on its own at the shapes a decode step
runs: the four linear layers of a block as GEMMs x[B, K] @ W[K, N], and decode attention of one
query token over a KV cache of ``ctx`` tokens. Values do not change the time, so weights and
activations are random; flops and bytes come from the shapes, for roofline comparisons.

Pure: tensors are made from the seed, nothing is read or written, metrics are returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from gemvlab.bench.timing import device_times_us, l2_flush_buffer, spread
from gemvlab.hwsim.costs import gemm_cost

log = logging.getLogger(__name__)

# Weight scale: keeps fp16 products finite (values do not change the time, infs might).
_W_STD = 0.02


def gemm_shapes(d_model: int, d_ff: int) -> dict[str, tuple[int, int]]:
    """(K, N) of each linear layer of a decoder block (fused QKV, output projection, FFN)."""
    return {"qkv": (d_model, 3 * d_model), "proj": (d_model, d_model), "ffn1": (d_model, d_ff),
            "ffn2": (d_ff, d_model)}


def attention_cost(b: int, heads: int, ctx: int, head_dim: int,
                   element_size: int) -> tuple[int, int]:
    """(flops, bytes) of one query token attending over ``ctx`` cached keys and values:
    QK^T and PV each 2*ctx*head_dim per head; K and V read, q read and the output written."""
    flops = 4 * b * heads * ctx * head_dim
    return flops, (2 * b * heads * ctx * head_dim + 2 * b * heads * head_dim) * element_size


def measure_decode_ops(*, d_model: int, heads: int, d_ff: int, batches: Sequence[int],
                       contexts: Sequence[int], attn_batches: Sequence[int], device: str,
                       dtype: torch.dtype, warmup: int, repeats: int, seed: int,
                       on_row: Callable[[str], None] | None = None) -> dict[str, float]:
    """Flat metrics ``gpu/<op>/b<B>/<measure>`` for every linear op and batch in ``batches``
    and every ``attn_c<ctx>`` and batch in ``attn_batches``.

    Measures: median_us, p10_us, p90_us (device time per call over ``repeats`` calls after
    ``warmup``: CUDA events after an L2 flush, launch overhead excluded; CPU: perf_counter),
    flops and bytes (from the shape, ``dtype``'s element size). A combination that runs out of
    GPU memory gets ``oom`` = 1 and no times. ``on_row`` is called with ``<op>/b<B>`` after each
    combination (a progress bar).
    """
    _check_args(d_model=d_model, heads=heads, d_ff=d_ff, batches=batches, contexts=contexts,
                attn_batches=attn_batches, warmup=warmup, repeats=repeats)
    dev = torch.device(device)
    size = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(seed)
    flush = l2_flush_buffer(dev)
    metrics: dict[str, float] = {}

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype) * std

    def record(op: str, b: int, build: Callable[[], Callable[[], Tensor]], flops: int,
               nbytes: int) -> None:
        key = f"gpu/{op}/b{b}"
        metrics[f"{key}/flops"] = float(flops)
        metrics[f"{key}/bytes"] = float(nbytes)
        try:
            with torch.inference_mode():
                times, _ = device_times_us(build(), dev, warmup, repeats, flush)
        except torch.cuda.OutOfMemoryError:
            log.warning("%s out of memory: skipped", key)
            metrics[f"{key}/oom"] = 1.0
        else:
            median, p10, p90 = spread(times)
            metrics[f"{key}/median_us"] = median
            metrics[f"{key}/p10_us"] = p10
            metrics[f"{key}/p90_us"] = p90
        _free(dev)  # after the handler: the failed call's tensors are unreachable by now
        if on_row is not None:
            on_row(f"{op}/b{b}")

    for op, (k, n) in gemm_shapes(d_model, d_ff).items():
        try:
            w: Tensor | None = randn(k, n, std=_W_STD)
        except torch.cuda.OutOfMemoryError:  # no weight, so every batch of this op is skipped
            w = None
        for b in batches:
            if w is None:
                record(op, b, _raise_oom, *gemm_cost(b, k, n, size))
            else:
                record(op, b, lambda b=b, k=k, w=w: partial(torch.matmul, randn(b, k), w),
                       *gemm_cost(b, k, n, size))
        del w
        _free(dev)

    head_dim = d_model // heads

    def attention(b: int, ctx: int) -> Callable[[], Tensor]:
        q = randn(b, heads, 1, head_dim)
        k, v = randn(b, heads, ctx, head_dim), randn(b, heads, ctx, head_dim)
        return partial(F.scaled_dot_product_attention, q, k, v)

    for ctx in contexts:
        for b in attn_batches:
            record(f"attn_c{ctx}", b, partial(attention, b, ctx),
                   *attention_cost(b, heads, ctx, head_dim, size))
    return metrics


def _raise_oom() -> Callable[[], Tensor]:
    raise torch.cuda.OutOfMemoryError("the op's weight did not fit")


def _free(dev: torch.device) -> None:
    """Return cached blocks, so that one combination's tensors do not crowd out the next."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _check_args(*, d_model: int, heads: int, d_ff: int, batches: Sequence[int],
                contexts: Sequence[int], attn_batches: Sequence[int], warmup: int,
                repeats: int) -> None:
    """Refuse what would time nothing or a shape no model has, naming the argument."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for name, value in (("d_model", d_model), ("heads", heads), ("d_ff", d_ff)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if d_model % heads:
        raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
    if not batches:
        raise ValueError("batches is empty: nothing to time")
    for name, values in (("batches", batches), ("contexts", contexts),
                         ("attn_batches", attn_batches)):
        bad = [v for v in values if v < 1]
        if bad:
            raise ValueError(f"{name} must be positive, got {bad}")
