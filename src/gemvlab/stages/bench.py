"""Stage bench: linear-layer speed of the int8 implementations against a dense layer.

A benchmark writes results (medians over repeats, ratios from one run); it is never a timed
test. Metrics are ``speed/<impl>/<M>x<K>x<N>/<measure>``.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from gemvlab.errors import GemvlabError
from gemvlab.stage import StageContext, stage

log = logging.getLogger(__name__)

# median/p10/p90: device time per call with launches queued ahead (as under CUDA graphs);
# eager_us: one call's host latency from an idle GPU, launch overhead included (CUDA only).
_MEASURES = ("median_us", "p10_us", "p90_us", "eager_us", "gbps", "tflops", "rel_err",
             "weight_bytes")


def peak_gbps(device_name: str, table: dict) -> float | None:
    """The configured peak bandwidth of the first name fragment the device name contains."""
    return next((float(v) for k, v in table.items() if k in device_name), None)


@stage("bench")
def bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    import torch

    from gemvlab.kernels.linear_bench import benchmark_linears
    from gemvlab.models.load import torch_dtype

    bcfg = cfg.bench
    if bcfg.name == "none":
        raise GemvlabError("bench=none: pick a benchmark, e.g. bench=int8_cpu or bench=int8_gpu")
    if bcfg.device == "cuda" and not torch.cuda.is_available():
        raise GemvlabError(f"bench={bcfg.name} needs a CUDA GPU and torch sees none: run it on a "
                           "GPU machine (profile gpu), or bench=int8_cpu here")
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


if __name__ == "__main__":
    bench()
