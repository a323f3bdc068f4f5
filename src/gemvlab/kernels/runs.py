"""Runners of the kernel benchmarks (stage bench): linear-layer speed of the int8
implementations against a dense layer (``kind: int8``, the default), the packed RTN and GLVQ
decode GEMVs (``kind: lattice``), and the operators of one batched decode step
(``kind: decode_ops``: linear-layer GEMMs and decode attention at one model shape, which
calibrate the hardware simulator's GPU model).

A benchmark writes results (medians over repeats, ratios from one run); it is never a timed
test. Metrics are ``speed/<impl>/<M>x<K>x<N>/<measure>`` (int8) and, for lattice,
``speed/<impl>/<bits>b/<M>x<K>x<N>/<measure>``, ``speed/<impl>/<bits>b/model/tokens_per_s``, ratios
``decode_ratio/glvq_over_rtn/<bits>b/<M>x<K>x<N>`` (median times) and
``tokens_ratio/glvq_over_rtn/<bits>b`` (tokens/s). For decode_ops: ``gpu/<op>/b<B>/<measure>``,
op one of qkv, proj, ffn1, ffn2, attn_c<ctx>; measure median_us, p10_us, p90_us, flops, bytes,
and oom (1, without times) where the combination ran out of GPU memory.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gemvlab.bench.kinds import bench_kind, bench_on_cuda, require_device
from gemvlab.errors import GemvlabError
from gemvlab.registry import runner
from gemvlab.stage import StageContext

log = logging.getLogger(__name__)

# median/p10/p90: device time per call with launches queued ahead (as under CUDA graphs);
# eager_us: one call's host latency from an idle GPU, launch overhead included (CUDA only).
_MEASURES = ("median_us", "p10_us", "p90_us", "eager_us", "gbps", "tflops", "rel_err",
             "weight_bytes")
# Of those, all but rel_err and weight_bytes read the clock (peak_share: gbps over the peak).
_SPEED_TIMED = ("speed/*_us", "speed/*/gbps", "speed/*/tflops", "speed/*/peak_share")


def peak_gbps(device_name: str, table: dict) -> float | None:
    """The configured peak bandwidth of the first name fragment the device name contains."""
    return next((float(v) for k, v in table.items() if k in device_name), None)


@runner("bench", "int8", applies=bench_kind("int8"), uses_model=False, needs_gpu=bench_on_cuda,
        reads=("bench",), timed=_SPEED_TIMED)
def int8_bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """Linear-layer speed of the int8 implementations against a dense layer."""
    from gemvlab.kernels.linear_bench import benchmark_linears
    from gemvlab.models.load import torch_dtype

    bcfg = cfg.bench
    require_device(bcfg)
    rows = benchmark_linears([tuple(int(d) for d in s) for s in bcfg.shapes], list(bcfg.impls),
                             device=str(bcfg.device), dtype=torch_dtype(bcfg.dtype),
                             threshold=float(bcfg.threshold), outlier_dims=int(bcfg.outlier_dims),
                             outlier_value=float(bcfg.outlier_value), warmup=int(bcfg.warmup),
                             repeats=int(bcfg.repeats), seed=int(cfg.seed))
    metrics: dict[str, float] = {}
    peak = None
    for row in rows:
        if row.get("skipped"):
            log.warning("%s skipped at %sx%sx%s: %s", row["impl"], row["m"], row["k"], row["n"],
                        row.get("reason", ""))
            continue
        key = f"speed/{row['impl']}/{row['m']}x{row['k']}x{row['n']}"
        for measure in _MEASURES:
            if row.get(measure) is not None:
                metrics[f"{key}/{measure}"] = float(row[measure])
        peak = peak_gbps(str(row.get("device_name", "")), dict(bcfg.peak_gbps))
        if peak:
            metrics[f"{key}/peak_share"] = float(row["gbps"]) / peak
    if peak:
        metrics["peak_gbps"] = peak
    return metrics


def _speed_metrics(rows: list[dict[str, Any]], peaks: dict) -> dict[str, float]:
    """Layer rows as ``speed/<impl>/<bits>b/<shape>/<measure>``, and the GLVQ/RTN time ratio."""
    metrics: dict[str, float] = {}
    medians: dict[tuple[str, int, str], float] = {}
    for row in rows:
        shape = f"{row['m']}x{row['k']}x{row['n']}"
        key = f"speed/{row['impl']}/{row['bits']}b/{shape}"
        for measure in _MEASURES:
            if row.get(measure) is not None:
                metrics[f"{key}/{measure}"] = float(row[measure])
        peak = peak_gbps(str(row["device_name"]), peaks)
        if peak:
            metrics[f"{key}/peak_share"] = float(row["gbps"]) / peak
            metrics["peak_gbps"] = peak
        medians[row["impl"], row["bits"], shape] = float(row["median_us"])
    for (impl, bits, shape), median in medians.items():
        if impl == "glvq" and ("rtn", bits, shape) in medians:
            metrics[f"decode_ratio/glvq_over_rtn/{bits}b/{shape}"] = (
                median / medians["rtn", bits, shape])
    return metrics


@runner("bench", "lattice", applies=bench_kind("lattice"), uses_model=False,
        needs_gpu=bench_on_cuda, reads=("bench",),
        timed=(*_SPEED_TIMED, "speed/*/tokens_per_s", "decode_ratio/*", "tokens_ratio/*"))
def lattice_bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """Decode GEMV per layer shape and tokens/s of the whole model, RTN vs GLVQ at equal bits."""
    from gemvlab.kernels.decode_bench import benchmark_decode, benchmark_model_decode
    from gemvlab.models.load import torch_dtype

    bcfg, seed = cfg.bench, int(cfg.seed)
    require_device(bcfg)
    dtype = torch_dtype(bcfg.dtype)
    common = dict(device=str(bcfg.device), dtype=dtype, d=int(bcfg.d),
                  group_size=int(bcfg.group_size), seed=seed)
    bits = [int(b) for b in bcfg.bits]
    rows = benchmark_decode([tuple(int(d) for d in s) for s in bcfg.shapes], bits,
                            list(bcfg.impls), warmup=int(bcfg.warmup), repeats=int(bcfg.repeats),
                            quantize_max_weights=int(bcfg.quantize_max_weights), **common)
    metrics = _speed_metrics(rows, dict(bcfg.peak_gbps))
    mcfg = bcfg.model
    tokens: dict[tuple[str, int], float] = {}
    for row in benchmark_model_decode(
            str(mcfg.model_type), OmegaConf.to_container(mcfg.shape), bits, list(bcfg.impls),
            prompt_tokens=int(mcfg.prompt_tokens), new_tokens=int(mcfg.new_tokens),
            warmup=int(mcfg.warmup), repeats=int(mcfg.repeats), **common):
        tokens[row["impl"], row["bits"]] = float(row["tokens_per_s"])
        metrics[f"speed/{row['impl']}/{row['bits']}b/model/tokens_per_s"] = float(
            row["tokens_per_s"])
    for (impl, b), rate in tokens.items():
        if impl == "glvq" and ("rtn", b) in tokens:
            metrics[f"tokens_ratio/glvq_over_rtn/{b}b"] = rate / tokens["rtn", b]
    return metrics


@runner("bench", "decode_ops", applies=bench_kind("decode_ops"), uses_model=False,
        needs_gpu=bench_on_cuda, reads=("bench",), timed=("gpu/*_us",))
def decode_ops_bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """GEMMs of a decode step's linear layers by batch and decode attention by context and
    batch, at ``bench.shape``; see ``kernels.decode_ops_bench``."""
    from tqdm.auto import tqdm

    from gemvlab.kernels.decode_ops_bench import measure_decode_ops
    from gemvlab.models.load import torch_dtype

    bcfg, seed = cfg.bench, int(cfg.seed)
    require_device(bcfg)
    shape = bcfg.shape
    batches = [int(b) for b in bcfg.batches]
    contexts = [int(c) for c in bcfg.contexts]
    attn_batches = [int(b) for b in bcfg.attn_batches]
    bar = tqdm(total=4 * len(batches) + len(contexts) * len(attn_batches),
               desc=f"{bcfg.name} decode ops", unit="op")

    def done(op: str) -> None:
        bar.set_postfix_str(op)
        bar.update()

    try:
        metrics = measure_decode_ops(
            d_model=int(shape.d_model), heads=int(shape.heads), d_ff=int(shape.d_ff),
            batches=batches, contexts=contexts, attn_batches=attn_batches,
            device=str(bcfg.device), dtype=torch_dtype(bcfg.dtype), warmup=int(bcfg.warmup),
            repeats=int(bcfg.repeats), seed=seed, on_row=done)
    except ValueError as exc:
        raise GemvlabError(f"bench={bcfg.name}: {exc}") from exc
    finally:
        bar.close()
    return metrics


