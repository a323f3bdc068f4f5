"""Runner of stage evaluate: perplexity on held-out prose and the lm-eval suite, for one model."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from gemvlab.registry import MODEL_RUN_TIMED, runner
from gemvlab.results.provenance import peak_rss_mb
from gemvlab.stage import StageContext


@runner("evaluate", "model", timed=MODEL_RUN_TIMED)
def evaluate(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.eval.suite import evaluation_metrics
    from gemvlab.models.load import load_run_model

    resources = Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_run_model(cfg, resources)
    metrics: dict[str, float] = {"load_s": round(time.perf_counter() - t0, 3)}
    metrics.update(evaluation_metrics(model, tokenizer, cfg, resources))
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return metrics

