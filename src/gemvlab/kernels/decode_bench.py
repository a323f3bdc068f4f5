"""Time the packed RTN and GLVQ decode GEMVs at equal bits, per layer shape and in a whole model.

Pure: tensors come from the seed, nothing is read or written, rows are returned. Each layer row
carries its error against a float64 product with the weight it decodes (the dequantized codes;
the unquantized weight for dense), so a fast but wrong kernel shows next to its time.

Codes: shapes of at most ``quantize_max_weights`` weights get real codes (``rtn_quantize``, and
``glvq_quantize`` with H = I, one training step, uniform bits); larger ones, and every layer of
the model benchmark, get random codes of the formats' dtypes and ranges (``random_group_quant``,
``random_lattice_quant``). Decode time does not depend on the code values, and calibrating a
7B model's layers would take far longer than timing them.
"""

from __future__ import annotations

import math
import platform
import statistics
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from gemvlab.bench.models import paper_shape_lm
from gemvlab.bench.timing import (
    Stopwatch,
    check_bench_args,
    device_times_us,
    l2_flush_buffer,
    spread,
)
from gemvlab.kernels.lattice_gemv import (
    PackedLinear,
    glvq_gemv,
    pack_glvq,
    pack_rtn,
    rtn_gemv,
)
from gemvlab.quant.glvq import GLVQConfig, LatticeQuant, glvq_quantize
from gemvlab.quant.groupwise import GroupQuant, rtn_quantize

IMPLS = ("dense", "rtn", "glvq")
# Standard deviation of the random weights (the Llama initialiser's), for the random codes.
_WEIGHT_STD = 0.02


def random_group_quant(n: int, k: int, bits: int, group_size: int,
                       gen: torch.Generator) -> GroupQuant:
    """RTN codes drawn at random (uniform codes and zero points, weight std about 0.02)."""
    dev = gen.device
    groups = k // group_size
    step = _WEIGHT_STD * math.sqrt(12) / 2**bits
    scale = step * (0.5 + torch.rand(n, groups, generator=gen, device=dev))
    return GroupQuant(
        torch.randint(0, 2**bits, (n, k), generator=gen, device=dev, dtype=torch.uint8),
        scale.half(),
        torch.randint(0, 2**bits, (n, groups), generator=gen, device=dev, dtype=torch.uint8),
        bits, group_size)


def random_lattice_quant(n: int, k: int, bits: int, d: int, group_size: int,
                         gen: torch.Generator) -> LatticeQuant:
    """GLVQ codes drawn at random: uniform codes, G = I + 0.1 N(0, 1) per group, mu uniform in
    [10, 255] per group, uniform bits; weights bounded by the scale (about 0.05)."""
    dev = gen.device
    groups = k // group_size
    half = 2 ** (bits - 1)
    G = torch.eye(d, device=dev) + 0.1 * torch.randn(groups, d, d, generator=gen, device=dev)
    return LatticeQuant(
        torch.randint(-half, half, (n, k), generator=gen, device=dev, dtype=torch.int8),
        G.half(), (10 + 245 * torch.rand(groups, generator=gen, device=dev)).half(),
        (0.05 * (0.5 + torch.rand(n, groups, generator=gen, device=dev))).half(),
        torch.full((groups,), bits, dtype=torch.int64, device=dev), group_size)


def _codes(impl: str, w: Tensor, bits: int, d: int, group_size: int, quantize: bool,
           gen: torch.Generator) -> GroupQuant | LatticeQuant:
    """Codes of one layer: real (quantized from w) or random, see the module docstring."""
    n, k = w.shape
    if not quantize:
        return (random_group_quant(n, k, bits, group_size, gen) if impl == "rtn"
                else random_lattice_quant(n, k, bits, d, group_size, gen))
    w = w.float().cpu()  # glvq_quantize runs on the CPU
    if impl == "rtn":
        return rtn_quantize(w, bits, group_size)
    cfg = GLVQConfig(bits=bits, d=d, group_size=group_size, steps=1, salience_share=0.0)
    return glvq_quantize(w, torch.eye(k), cfg)


def _device_name(dev: torch.device) -> str:
    return (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else platform.processor() or platform.machine())


def _build(impl: str, w: Tensor, x: Tensor, bits: int, d: int, group_size: int, quantize: bool,
           gen: torch.Generator) -> tuple[Callable[[], Tensor], int, Tensor]:
    """(call, bytes it reads for the weight, the weight it computes with, float64)."""
    if impl == "dense":
        w_d = w.to(x.dtype)
        return partial(F.linear, x, w_d), w_d.numel() * w_d.element_size(), w.double()
    q = _codes(impl, w, bits, d, group_size, quantize, gen)
    w_hat = q.dequantize().to(x.device, torch.float64)
    if impl == "rtn":
        packed = pack_rtn(q).to(x.device)
        return partial(rtn_gemv, x, packed), packed.nbytes, w_hat
    packed_l = pack_glvq(q).to(x.device)
    return partial(glvq_gemv, x, packed_l), packed_l.nbytes, w_hat


def benchmark_decode(shapes: list[tuple[int, int, int]], bits_list: list[int], impls: list[str],
                     *, device: str, dtype: torch.dtype, d: int, group_size: int, warmup: int,
                     repeats: int, seed: int, quantize_max_weights: int = 0,
                     progress: bool = True) -> list[dict[str, Any]]:
    """One row per (shape, bits, impl); shape = (M, K, N): x [M, K] times W [N, K]^T.

    impls: "dense" (F.linear of the unquantized W in ``dtype``, one row per shape with bits =
    the dtype's width), "rtn" and "glvq" (the packed decode GEMVs of ``lattice_gemv``; GLVQ with
    per-group G and mu-law). W ~ N(0, 0.02^2), x ~ N(0, 1). Times in microseconds over
    ``repeats`` calls, measured as in ``linear_bench`` (CUDA events after an L2 flush; CPU
    perf_counter); gbps = weight_bytes (packed codes and every scale, zero, G, mu) / median.
    """
    check_bench_args(impls, IMPLS, warmup, repeats)
    dev = torch.device(device)
    name = _device_name(dev)
    flush = l2_flush_buffer(dev)
    dense_bits = torch.finfo(dtype).bits
    jobs = [(shape, bits, impl) for shape in shapes for impl in impls
            for bits in ([dense_bits] if impl == "dense" else bits_list)]
    rows: list[dict[str, Any]] = []
    gen = torch.Generator(device=dev).manual_seed(seed)
    for (m, k, n), bits, impl in tqdm(jobs, desc="decode bench", disable=not progress):
        data = torch.Generator(device=dev).manual_seed(seed + m * k + n)
        w = torch.randn(n, k, generator=data, device=dev) * _WEIGHT_STD
        x = torch.randn(m, k, generator=data, device=dev).to(dtype)
        quantize = n * k <= quantize_max_weights
        with torch.no_grad():  # not inference_mode: glvq_quantize trains G under enable_grad
            fn, weight_bytes, w_ref = _build(impl, w, x, bits, d, group_size, quantize, gen)
            ref = x.double() @ w_ref.T
            diff = fn().double() - ref
            times, eager = device_times_us(fn, dev, warmup, repeats, flush)
        median, p10, p90 = spread(times)
        rows.append({
            "impl": impl, "bits": bits, "m": m, "k": k, "n": n,
            "dtype": str(dtype).removeprefix("torch."), "group_size": group_size, "d": d,
            "codes": "float" if impl == "dense" else ("quantized" if quantize else "random"),
            "device_name": name, "median_us": median, "p10_us": p10, "p90_us": p90,
            "eager_us": statistics.median(eager) if eager else None,
            "weight_bytes": weight_bytes, "gbps": weight_bytes / median / 1e3,
            "max_abs_err": diff.abs().max().item(), "rel_err": (diff.norm() / ref.norm()).item()})
        del w, x, fn, w_ref, ref, diff
    return rows


def _pack_linears(model: nn.Module, impl: str, bits: int, d: int, group_size: int,
                  gen: torch.Generator) -> tuple[dict[str, nn.Module], int]:
    """Swap every nn.Linear but the output head for a PackedLinear of random codes; returns
    the originals (to swap back) and the packed bytes."""
    originals: dict[str, nn.Module] = {}
    total = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name.endswith("lm_head"):
            continue
        n, k = mod.weight.shape
        packed = (pack_rtn(random_group_quant(n, k, bits, group_size, gen)) if impl == "rtn"
                  else pack_glvq(random_lattice_quant(n, k, bits, d, group_size, gen)))
        total += packed.nbytes
        originals[name] = mod
        _set(model, name, PackedLinear(packed, mod.bias))
    return originals, total


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _decode_seconds(model: nn.Module, prompt: Tensor, new_tokens: int) -> float:
    """Greedy decode of ``new_tokens`` after the prompt, batch 1, with the KV cache; the
    prompt's forward pass is not timed."""
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    with Stopwatch(prompt.device) as watch:
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return watch.seconds


def benchmark_model_decode(model_type: str, shape: Mapping[str, Any], bits_list: list[int],
                           impls: list[str], *, device: str, dtype: torch.dtype, d: int,
                           group_size: int, prompt_tokens: int, new_tokens: int, warmup: int,
                           repeats: int, seed: int,
                           progress: bool = True) -> list[dict[str, Any]]:
    """Tokens/s of greedy batch-1 decoding, one row per (impl, bits): a random model of the
    given shape whose linear layers (not the head) decode packed codes on every call.

    Each repeat runs the prompt (random ids, untimed), then times ``new_tokens`` one-token
    steps; tokens_per_s = new_tokens / the median time. Eager PyTorch (no CUDA graphs), so
    launch overheads count, as in a plain HF decode loop.
    """
    check_bench_args(impls, IMPLS, warmup, repeats)
    if prompt_tokens < 1 or new_tokens < 1:
        raise ValueError("prompt_tokens and new_tokens must be >= 1")
    dev = torch.device(device)
    model = paper_shape_lm(model_type, shape, dtype, dev, seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=gen,
                           device=dev)
    dense_bits = torch.finfo(dtype).bits
    jobs = [(impl, bits) for impl in impls
            for bits in ([dense_bits] if impl == "dense" else bits_list)]
    rows: list[dict[str, Any]] = []
    for impl, bits in tqdm(jobs, desc="model decode", disable=not progress):
        originals: dict[str, nn.Module] = {}
        linear_bytes = sum(m.weight.numel() * m.weight.element_size()
                           for name, m in model.named_modules()
                           if isinstance(m, nn.Linear) and not name.endswith("lm_head"))
        if impl != "dense":
            originals, linear_bytes = _pack_linears(model, impl, bits, d, group_size, gen)
        with torch.inference_mode():
            for _ in range(warmup):
                _decode_seconds(model, prompt, new_tokens)
            times = [_decode_seconds(model, prompt, new_tokens) for _ in range(repeats)]
        for name, mod in originals.items():
            _set(model, name, mod)
        median = statistics.median(times)
        rows.append({
            "impl": impl, "bits": bits, "model_type": model_type,
            "layers": int(model.config.num_hidden_layers), "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "dtype": str(dtype).removeprefix("torch."),
            "device_name": _device_name(dev), "decode_s": median,
            "tokens_per_s": new_tokens / median, "linear_bytes": linear_bytes})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows
