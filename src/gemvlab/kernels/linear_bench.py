"""Time dense and LLM.int8() linear layers on one device, and check what each one computes.

Pure: tensors are made from the seed, nothing is read or written, rows are returned. Each row
carries its own error against a float64 product of the same unquantized x and W, so a fast
but wrong kernel shows in the table next to its time.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from gemvlab.bench.timing import check_bench_args, device_times_us, l2_flush_buffer, spread
from gemvlab.quant.int8 import quantize, quantized_matmul

IMPLS = ("dense", "gemvlab", "bnb")


def benchmark_linears(shapes: list[tuple[int, int, int]], impls: list[str], *, device: str,
                      dtype: torch.dtype, threshold: float, outlier_dims: int,
                      outlier_value: float, warmup: int, repeats: int, seed: int,
                      progress: bool = True) -> list[dict[str, Any]]:
    """One row per (shape, impl); shape = (M, K, N): x [M, K] times W [N, K]^T.

    impls: "dense" (F.linear in ``dtype``; pass float16 on CUDA, float32 on CPU), "gemvlab"
    (CUDA: the Triton ``llm_int8_linear``; CPU: ``quant.int8.quantized_matmul``), "bnb"
    (bitsandbytes ``Linear8bitLt`` without fp16 weights; a row with ``skipped`` set when it
    cannot be imported or fails on the device). Inputs: W ~ N(0, 0.02^2), x ~ N(0, 1) with
    ``outlier_dims`` seeded input columns set to +-outlier_value in every row, so the outlier
    decomposition runs. Times in microseconds over ``repeats`` calls: median, p10, p90 of the
    device time per call (CUDA events after an L2 flush, launch overhead excluded; CPU:
    perf_counter), and on CUDA ``eager_us``, the median host latency of one call from an idle
    GPU, launch overhead and host syncs included (None on CPU).
    """
    check_bench_args(impls, IMPLS, warmup, repeats)
    dev = torch.device(device)
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else platform.processor() or platform.machine())
    flush = l2_flush_buffer(dev)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(shapes) * len(impls), desc="linear bench", disable=not progress) as bar:
        for m, k, n in shapes:
            x, w = _inputs(m, k, n, dev, dtype, outlier_dims, outlier_value, seed)
            ref = x.double() @ w.double().t()
            for impl in impls:
                bar.set_postfix_str(f"{impl} {m}x{k}x{n}")
                row: dict[str, Any] = {
                    "impl": impl, "m": m, "k": k, "n": n, "dtype": str(dtype).removeprefix(
                        "torch."), "threshold": threshold, "outlier_dims": outlier_dims,
                    "device_name": device_name, "median_us": None, "p10_us": None,
                    "p90_us": None, "eager_us": None, "weight_bytes": None, "gbps": None,
                    "tflops": None, "max_abs_err": None, "rel_err": None, "skipped": None}
                with torch.inference_mode():
                    built = _build(impl, x, w, dtype, threshold)
                    if isinstance(built, str):
                        row["skipped"] = built
                    else:
                        fn, weight_bytes, y = built
                        diff = y.double() - ref
                        times, eager = device_times_us(fn, dev, warmup, repeats, flush)
                        median, p10, p90 = spread(times)
                        row.update(
                            median_us=median, p10_us=p10, p90_us=p90,
                            eager_us=statistics.median(eager) if eager else None,
                            weight_bytes=weight_bytes,
                            gbps=weight_bytes / median / 1e3, tflops=2 * m * n * k / median / 1e6,
                            max_abs_err=diff.abs().max().item(),
                            rel_err=(diff.norm() / ref.norm()).item())
                rows.append(row)
                bar.update()
            del x, w, ref
    return rows


def _inputs(m: int, k: int, n: int, dev: torch.device, dtype: torch.dtype, outlier_dims: int,
            outlier_value: float, seed: int) -> tuple[Tensor, Tensor]:
    """x [M, K] in ``dtype`` with fixed outlier columns, W [N, K] float32; same for any impl."""
    if not 0 <= outlier_dims <= k:
        raise ValueError(f"outlier_dims must be in [0, K={k}], got {outlier_dims}")
    gen = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(n, k, generator=gen, device=dev) * 0.02
    x = torch.randn(m, k, generator=gen, device=dev)
    cols = torch.randperm(k, generator=gen, device=dev)[:outlier_dims]
    signs = torch.randint(0, 2, (m, outlier_dims), generator=gen, device=dev) * 2 - 1
    x[:, cols] = signs.float() * outlier_value
    return x.to(dtype), w


def _build(impl: str, x: Tensor, w: Tensor, dtype: torch.dtype,
           threshold: float) -> tuple[Callable[[], Tensor], int, Tensor] | str:
    """(call, weight bytes it reads, its first output), or the reason it cannot run."""
    n, k = w.shape
    if impl == "dense":
        w_d = w.to(dtype)
        fn: Callable[[], Tensor] = partial(F.linear, x, w_d)
        return fn, w_d.numel() * w_d.element_size(), fn()
    if impl == "gemvlab":
        qw = quantize(w, per_row=True, zeropoint=False)
        if x.is_cuda:
            from gemvlab.kernels.int8_triton import llm_int8_linear

            fn = partial(llm_int8_linear, x, qw.q, qw.scale.reshape(-1), threshold)
        else:
            fn = partial(quantized_matmul, x, qw, per_row=True, zeropoint=False,
                         threshold=threshold)
        return fn, qw.nbytes, fn()
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False,
                                    threshold=threshold)
        layer.load_state_dict({"weight": w.to(torch.float16).cpu()})
        layer = layer.to(x.device)
        fn = partial(layer, x)
        y = fn()
    except Exception as err:  # any failure of the peer library on this device is a skip
        return f"bitsandbytes unavailable here: {type(err).__name__}: {err}"[:300]
    return fn, n * k + 4 * n, y
