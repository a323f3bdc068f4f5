"""Runner of stage quantize: load a model, analyse it, quantize its linear layers, evaluate."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from gemvlab.data import data_dir
from gemvlab.errors import GemvlabError
from gemvlab.files import atomic_write_text
from gemvlab.registry import MODEL_RUN_TIMED, runner
from gemvlab.results.provenance import peak_rss_mb
from gemvlab.stage import StageContext

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def outlier_metrics(model, tokenizer, cfg: DictConfig, resources: Path,
                    run_dir: Path) -> dict[str, float]:
    """Outlier features over calibration text; the per-layer dims go to outliers.json."""
    from gemvlab.data import read_texts
    from gemvlab.quant.outliers import collect_hits, outlier_report

    acfg = cfg.analysis
    docs = read_texts(data_dir(resources, "austen") / "calibration.jsonl")
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0][: int(acfg.tokens)]
    seq = int(acfg.seq_len)
    device = next(model.parameters()).device
    batches = [ids[i: i + seq].unsqueeze(0).to(device) for i in range(0, len(ids), seq)]
    hits, largest = collect_hits(model, batches, list(acfg.modules), float(acfg.threshold))
    report = outlier_report(hits, float(acfg.min_layer_share), float(acfg.min_position_share))
    atomic_write_text(run_dir / "outliers.json", json.dumps({
        "threshold": float(acfg.threshold), "dims": report.dims,
        "per_layer": report.per_layer}, indent=1) + "\n")
    shown = report.dims[:16] + (["..."] if len(report.dims) > 16 else [])
    log.info("%s: %d outlier features %s (layers %.0f%%, positions %.0f%%)", cfg.model.name,
             len(report.dims), shown, 100 * report.layer_share, 100 * report.position_share)
    return {"outlier_dims": len(report.dims),
            "outlier_feature_share": len(report.dims) / report.hidden,
            "outlier_layer_share": report.layer_share,
            "outlier_position_share": report.position_share,
            "hidden": report.hidden, "layers": report.layers, "positions": report.positions,
            "max_abs_input": largest}


def calibration_batches(tokenizer, cfg: DictConfig, resources: Path,
                        device: torch.device) -> list[torch.Tensor]:
    """The first method.calibration.tokens tokens of the Austen calibration split, in
    sequences of method.calibration.seq_len."""
    from gemvlab.data import read_texts

    ccfg = cfg.method.calibration
    docs = read_texts(data_dir(resources, "austen") / "calibration.jsonl")
    ids = tokenizer("\n\n".join(docs), return_tensors="pt").input_ids[0]
    tokens, seq = int(ccfg.tokens), int(ccfg.seq_len)
    if len(ids) < tokens or tokens < seq:
        raise GemvlabError(f"method.calibration.tokens={tokens} must be between seq_len={seq} "
                           f"and the {len(ids)} tokens of the calibration split")
    return [ids[i: i + seq].unsqueeze(0).to(device) for i in range(0, tokens - seq + 1, seq)]


def weight_only_metrics(model: torch.nn.Module, tokenizer, cfg: DictConfig,
                        resources: Path) -> dict[str, float]:
    """Quantize the weights with method.kind rtn/gptq/glvq; bits per weight as stored."""
    import torch
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from gemvlab.quant.recipes import weight_quantizer
    from gemvlab.quant.weight_only import bits_per_weight, quantize_weights

    method = OmegaConf.to_container(cfg.method, resolve=True)
    quantizer = weight_quantizer(method)
    if method["kind"] == "rtn":
        batches = [torch.zeros(1, 1, dtype=torch.long)]  # RTN reads no inputs: one token
        tokens = 0
    else:
        batches = calibration_batches(tokenizer, cfg, resources,
                                      next(model.parameters()).device)
        tokens = sum(b.numel() for b in batches)
    bar = tqdm(desc=f"{cfg.method.name} blocks", unit="block")
    quants = quantize_weights(model, batches, quantizer, list(cfg.method.skip),
                              progress=lambda _path: bar.update())
    bar.close()
    weights = sum(q.codes.numel() for q in quants.values())
    bpw = bits_per_weight(quants)
    return {"layers_quantized": len(quants), "calibration_tokens": tokens,
            "bits_per_weight": bpw, "quantized_weights": weights,
            "linear_bytes": bpw * weights / 8}


def apply_method(model: torch.nn.Module, tokenizer, cfg: DictConfig,
                 resources: Path) -> dict[str, float]:
    """Quantize the model in place as the method config says; returns its metrics."""
    from gemvlab.quant.linear import Int8Scheme, quantize_linears, weight_bytes
    from gemvlab.quant.recipes import WEIGHT_ONLY

    method = cfg.method
    if method.kind in WEIGHT_ONLY:
        return weight_only_metrics(model, tokenizer, cfg, resources)
    if method.kind not in ("none", "int8"):
        raise GemvlabError(f"method.kind={method.kind} is unknown to the quantize stage: "
                           f"use none, int8 or one of {WEIGHT_ONLY}")
    layers = 0
    if method.kind == "int8":
        scheme = Int8Scheme(act=str(method.act), weight=str(method.weight),
                            zeropoint=bool(method.zeropoint), threshold=float(method.threshold))
        layers = quantize_linears(model, scheme, list(method.skip))
    return {"layers_quantized": layers, **weight_bytes(model, list(method.skip))}


@runner("quantize", "model_quantizers", timed=(*MODEL_RUN_TIMED, "quantize_s"))
def quantize(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.eval.suite import evaluation_metrics
    from gemvlab.models.load import load_run_model
    from gemvlab.quant.linear import decomposition_share

    resources = Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_run_model(cfg, resources)
    metrics: dict[str, float] = {"load_s": round(time.perf_counter() - t0, 3)}
    if cfg.analysis.name == "outliers":
        metrics.update(outlier_metrics(model, tokenizer, cfg, resources, ctx.run_dir))
    t1 = time.perf_counter()
    metrics.update(apply_method(model, tokenizer, cfg, resources))
    metrics["quantize_s"] = round(time.perf_counter() - t1, 3)
    metrics.update(evaluation_metrics(model, tokenizer, cfg, resources))
    share = decomposition_share(model)
    if share is not None:
        metrics["outlier_share_of_dims"] = share
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return metrics

