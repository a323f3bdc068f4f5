"""Stage bench: linear-layer speed of the int8 implementations against a dense layer
(``kind: int8``, the default), of the packed RTN and GLVQ decode GEMVs (``kind: lattice``), or of
one finetuning step per adapter implementation (``kind: finetune``, OFTv2's efficiency claim), or
of the operators of one batched decode step (``kind: decode_ops``: linear-layer GEMMs and decode
attention at one model shape, to calibrate the NeuPIMs simulator's GPU model).

A benchmark writes results (medians over repeats, ratios from one run); it is never a timed
test. Metrics are ``speed/<impl>/<M>x<K>x<N>/<measure>`` (int8) and, for lattice,
``speed/<impl>/<bits>b/<M>x<K>x<N>/<measure>``, ``speed/<impl>/<bits>b/model/tokens_per_s``, ratios
``decode_ratio/glvq_over_rtn/<bits>b/<M>x<K>x<N>`` (median times) and
``tokens_ratio/glvq_over_rtn/<bits>b`` (tokens/s). For finetune: ``step/<impl>/<model>/<measure>``
(step_ms the median, p10_ms, p90_ms, peak_mem_mb, base_mem_mb, trainable_params, oom) and
``ratio/<a>_over_<b>/<model>/{time,memory}`` (median step times, peak memories) for the pairs in
``_STEP_RATIOS`` whose rows both ran. For decode_ops: ``gpu/<op>/b<B>/<measure>``, op one of
qkv, proj, ffn1, ffn2, attn_c<ctx>; measure median_us, p10_us, p90_us, flops, bytes, and oom (1,
without times) where the combination ran out of GPU memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gemvlab.errors import GemvlabError
from gemvlab.stage import StageContext, stage

log = logging.getLogger(__name__)

# median/p10/p90: device time per call with launches queued ahead (as under CUDA graphs);
# eager_us: one call's host latency from an idle GPU, launch overhead included (CUDA only).
_MEASURES = ("median_us", "p10_us", "p90_us", "eager_us", "gbps", "tflops", "rel_err",
             "weight_bytes")
_STEP_MEASURES = ("step_ms", "p10_ms", "p90_ms", "peak_mem_mb", "base_mem_mb", "trainable_params",
                  "oom")
# ratio name -> (numerator impl, denominator impl): the paper's comparisons (OFTv2 against the
# weight-centric OFT and LoRA) and ours against peft's.
_STEP_RATIOS = {"oft_over_oftv2": ("oft", "oftv2"), "oftv2_over_lora": ("oftv2", "lora"),
                "oftv2_over_peft_oft": ("oftv2", "peft_oft"),
                "peft015_oft_over_peft_oft": ("peft015_oft", "peft_oft")}
# Where each kind runs without a GPU.
_CPU_BENCH = {"int8": "bench=int8_cpu", "lattice": "bench=glvq_cpu", "finetune": "bench=oftv2_cpu",
              "kv": "bench=kv_cpu", "kvq": "bench=commvq_cpu", "decode_ops": "bench=neupims_cpu"}


def peak_gbps(device_name: str, table: dict) -> float | None:
    """The configured peak bandwidth of the first name fragment the device name contains."""
    return next((float(v) for k, v in table.items() if k in device_name), None)


def run_bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """The stage body (``bench`` is its entry point; tests call this through ``execute``)."""
    import torch

    from gemvlab.kernels.linear_bench import benchmark_linears
    from gemvlab.models.load import torch_dtype

    bcfg = cfg.bench
    if bcfg.name == "none":
        raise GemvlabError("bench=none: pick a benchmark, e.g. bench=int8_cpu or bench=int8_gpu")
    kind = bcfg.get("kind", "int8")
    if kind not in _CPU_BENCH:
        raise GemvlabError(f"bench.kind={kind} is unknown: use one of {', '.join(_CPU_BENCH)}")
    if bcfg.device == "cuda" and not torch.cuda.is_available():
        raise GemvlabError(f"bench={bcfg.name} needs a CUDA GPU and torch sees none: run it on a "
                           f"GPU machine (profile gpu), or {_CPU_BENCH[kind]} here")
    if kind == "lattice":
        return lattice_metrics(bcfg, int(cfg.seed))
    if kind == "finetune":
        return finetune_metrics(bcfg, int(cfg.seed), cfg.get("threads"))
    if kind == "kv":
        return kv_metrics(cfg)
    if kind == "kvq":
        return kvq_metrics(bcfg, int(cfg.seed))
    if kind == "decode_ops":
        return decode_ops_metrics(bcfg, int(cfg.seed))
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


def lattice_metrics(bcfg: DictConfig, seed: int) -> dict[str, float]:
    """Decode GEMV per layer shape and tokens/s of the whole model, RTN vs GLVQ at equal bits."""
    from gemvlab.kernels.decode_bench import benchmark_decode, benchmark_model_decode
    from gemvlab.models.load import torch_dtype

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


def step_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Step rows as ``step/<impl>/<model>/<measure>``, and the time and memory ratios of
    ``_STEP_RATIOS`` where both rows ran (not skipped, not out of memory)."""
    metrics: dict[str, float] = {}
    ran: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row.get("skipped"):
            log.warning("%s skipped on %s: %s", row["impl"], row["model"], row.get("reason", ""))
            continue
        key = f"step/{row['impl']}/{row['model']}"
        if row.get("oom"):  # its times and memory describe a failed step: keep only the fact
            log.warning("%s out of memory on %s: %s", row["impl"], row["model"],
                        row.get("reason", ""))
            metrics[f"{key}/oom"] = 1.0
            if row.get("trainable_params") is not None:
                metrics[f"{key}/trainable_params"] = float(row["trainable_params"])
            continue
        for measure in _STEP_MEASURES:
            if row.get(measure) is not None:
                metrics[f"{key}/{measure}"] = float(row[measure])
        ran[row["impl"], row["model"]] = row
    for model in dict.fromkeys(model for _, model in ran):
        for name, (num, den) in _STEP_RATIOS.items():
            a, b = ran.get((num, model)), ran.get((den, model))
            if a and b:
                metrics[f"ratio/{name}/{model}/time"] = a["step_ms"] / b["step_ms"]
                metrics[f"ratio/{name}/{model}/memory"] = a["peak_mem_mb"] / b["peak_mem_mb"]
    return metrics


def finetune_metrics(bcfg: DictConfig, seed: int, threads: int | None) -> dict[str, float]:
    """One training step per (model, impl), each in its own process; see ``step_bench``."""
    from gemvlab.config import REPO_ROOT
    from gemvlab.finetune.step_bench import benchmark_steps

    models = OmegaConf.to_container(bcfg.models, resolve=True)
    # A dict, so that a derived config can drop its parent's models by setting them to null.
    models = [m for m in (models.values() if isinstance(models, dict) else models) if m]
    if not models:
        raise GemvlabError(f"bench={bcfg.name} lists no models: set bench.models")
    peft015 = bcfg.get("peft015_path")
    if peft015 and not Path(peft015).is_absolute():
        peft015 = str(REPO_ROOT / peft015)  # a config path names a folder of this repository
    try:
        rows = benchmark_steps(models, list(bcfg.impls), batch=int(bcfg.batch),
                               seq_len=int(bcfg.seq_len), device=str(bcfg.device),
                               dtype=str(bcfg.dtype), warmup=int(bcfg.warmup),
                               repeats=int(bcfg.repeats), seed=seed, peft015_path=peft015,
                               threads=threads)
    except (ValueError, RuntimeError) as exc:
        raise GemvlabError(str(exc)) from exc
    return step_metrics(rows)


def kv_metrics(cfg: DictConfig) -> dict[str, float]:
    """Decode step time, tokens/s and KV bytes per KV policy and budget; see ``speed_bench``."""
    from tqdm.auto import tqdm

    from gemvlab.bench.models import paper_shape_lm as build_model
    from gemvlab.kv.speed_bench import benchmark_kv_decode, speed_metrics
    from gemvlab.models.load import torch_dtype
    from gemvlab.stages.kv_eval import policies, settings

    bcfg = cfg.bench
    built, _ = policies(cfg.method)
    by_name = {p.name: p for p in built}
    unknown = [p for p in bcfg.policies if p not in by_name]
    if unknown:
        raise GemvlabError(f"bench.policies names {unknown}, not in method.policies "
                           f"({sorted(by_name)})")
    chosen = settings([by_name[p] for p in bcfg.policies], [float(b) for b in bcfg.budgets])
    mcfg = bcfg.model
    shape = OmegaConf.to_container(mcfg.shape, resolve=True)
    model = build_model(str(mcfg.model_type), shape, torch_dtype(bcfg.dtype), str(bcfg.device),
                        int(cfg.seed)).eval()
    total = len(bcfg.contexts) * len(bcfg.batches) * len(chosen)
    bar = tqdm(total=total, desc=f"{bcfg.name} decode", unit="setting")
    rows = benchmark_kv_decode(model, chosen, [int(c) for c in bcfg.contexts],
                               [int(b) for b in bcfg.batches], steps=int(bcfg.steps),
                               warmup=int(bcfg.warmup), seed=int(cfg.seed),
                               vocab=int(shape["vocab_size"]), on_row=lambda _: bar.update())
    bar.close()
    return speed_metrics(rows)


def kvq_metrics(bcfg: DictConfig, seed: int) -> dict[str, float]:
    """CommVQ attention over a compressed layer, decode-then-attend against codebook space,
    by context; and each setting's exact bits per cached value at the layer's shape."""
    from tqdm.auto import tqdm

    from gemvlab.kv import commvq
    from gemvlab.kv.commvq_speed import decode_speed
    from gemvlab.models.load import torch_dtype

    shape = bcfg.shape
    settings = [{"name": name, "levels": int(s.levels), "rows": int(s.bits) * shape.heads
                 * shape.head_dim,
                 "stages": commvq.key_stages(int(s.bits), int(shape.head_dim), int(s.levels))}
                for name, s in bcfg.settings.items()]
    bar = tqdm(total=len(bcfg.contexts) * len(settings), desc=f"{bcfg.name} decode",
               unit="setting")
    metrics = decode_speed([int(c) for c in bcfg.contexts], settings, int(shape.heads),
                           int(shape.q_heads), int(shape.head_dim), int(bcfg.window),
                           float(shape.rope_base), int(bcfg.repeats), int(bcfg.warmup),
                           str(bcfg.device), torch_dtype(bcfg.dtype), seed,
                           on_row=lambda _: bar.update())
    bar.close()
    # Bits per cached value from the packed layer itself (codes, norms, scales; window 0).
    values = 2 * int(shape.heads) * int(shape.head_dim)
    context = max(int(c) for c in bcfg.contexts)
    for setting in settings:
        per_token = metrics.get(f"bytes/{setting['name']}/{context}/kv_bytes_per_token")
        if per_token is not None and int(bcfg.window) == 0:
            metrics[f"memory/{setting['name']}/bits_per_value"] = 8 * per_token / values
            metrics[f"memory/{setting['name']}/reduction_vs_fp16"] = 1 - 8 * per_token / (
                16 * values)
    return metrics


def decode_ops_metrics(bcfg: DictConfig, seed: int) -> dict[str, float]:
    """GEMMs of a decode step's linear layers by batch and decode attention by context and
    batch, at ``bench.shape``; see ``kernels.decode_ops_bench``."""
    from tqdm.auto import tqdm

    from gemvlab.kernels.decode_ops_bench import measure_decode_ops
    from gemvlab.models.load import torch_dtype

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


bench = stage("bench")(run_bench)

if __name__ == "__main__":
    bench()
