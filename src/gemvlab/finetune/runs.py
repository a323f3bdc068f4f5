"""Runners of finetuning. Stage finetune: adapters (LoRA, OFT, OFTv2) on a frozen, optionally
4-bit base, trained on the Austen train split, then evaluated like every other model
(perplexity, lm-eval).

method.kind none trains nothing: the base model's row ("before"). Time and memory are those
of the training loop alone: per-step wall time, and the peak resident memory (CPU, reset when
training starts) or the peak allocated CUDA memory from the first step on.

Stage bench, ``bench.kind: finetune``: one training step per adapter implementation (OFTv2's
efficiency claim); metrics ``step/<impl>/<model>/<measure>`` (step_ms the median, p10_ms,
p90_ms, peak_mem_mb, base_mem_mb, trainable_params, oom) and
``ratio/<a>_over_<b>/<model>/{time,memory}`` (median step times, peak memories) for the pairs in
``_STEP_RATIOS`` whose rows both ran.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from gemvlab.bench.kinds import bench_kind, bench_on_cuda, require_device
from gemvlab.data import data_dir
from gemvlab.errors import GemvlabError
from gemvlab.registry import MODEL_RUN_TIMED, runner
from gemvlab.results.provenance import peak_rss_mb
from gemvlab.stage import StageContext

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

KINDS = ("none", "lora", "oft")
_STEP_MEASURES = ("step_ms", "p10_ms", "p90_ms", "peak_mem_mb", "base_mem_mb", "trainable_params",
                  "oom")
# ratio name -> (numerator impl, denominator impl): the paper's comparisons (OFTv2 against the
# weight-centric OFT and LoRA) and ours against peft's.
_STEP_RATIOS = {"oft_over_oftv2": ("oft", "oftv2"), "oftv2_over_lora": ("oftv2", "lora"),
                "oftv2_over_peft_oft": ("oftv2", "peft_oft"),
                "peft015_oft_over_peft_oft": ("peft015_oft", "peft_oft")}


def adapter_spec(method: DictConfig):
    from gemvlab.finetune.adapters import AdapterSpec

    try:
        if method.kind == "lora":
            return AdapterSpec(kind="lora", targets=tuple(method.targets), rank=int(method.rank),
                               alpha=float(method.alpha), dropout=float(method.dropout))
        return AdapterSpec(kind="oft", targets=tuple(method.targets),
                           block_size=int(method.block_size), form=str(method.form),
                           neumann_terms=int(method.neumann_terms))
    except ValueError as exc:
        raise GemvlabError(f"method={method.name}: {exc}") from None


def train_windows(tokenizer, cfg: DictConfig, resources: Path) -> torch.Tensor:
    """The first train.max_tokens tokens of the Austen train split, in windows of seq_len."""
    from gemvlab.data import read_texts
    from gemvlab.finetune.train import token_windows

    docs = read_texts(data_dir(resources, "austen") / "train.jsonl")
    tcfg = cfg.train
    text, budget = [], int(tcfg.max_tokens) * 8  # characters: tokenize only what can be used
    for doc in docs:
        text.append(doc)
        budget -= len(doc)
        if budget <= 0:
            break
    ids = tokenizer("\n\n".join(text), return_tensors="pt").input_ids[0][: int(tcfg.max_tokens)]
    return token_windows(ids, int(tcfg.seq_len))


class _Memory:
    """Peak memory of what runs after start(); ``before`` keeps the process's earlier peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = peak_rss_mb()

    def start(self) -> None:
        import torch

        from gemvlab.results.provenance import reset_peak_rss

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not reset_peak_rss():
            log.warning("this kernel cannot reset the peak RSS: train_peak_mem_mb includes "
                        "loading the model")

    def peak_mb(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mb()


def training_metrics(model: torch.nn.Module, tokenizer, cfg: DictConfig, resources: Path,
                     ctx: StageContext) -> dict[str, float]:
    """Add the method's adapters, train them, and report time, memory and the loss curve."""
    from tqdm.auto import tqdm

    from gemvlab.finetune.adapters import (
        add_adapters,
        max_orthogonality_error,
        trainable_parameters,
    )
    from gemvlab.finetune.train import TrainConfig, train

    method = cfg.method
    try:
        layers = add_adapters(model, adapter_spec(method))
    except ValueError as exc:
        raise GemvlabError(f"method={method.name}: {exc}") from None
    tcfg = cfg.train
    try:
        train_cfg = TrainConfig(steps=int(tcfg.steps), batch_size=int(tcfg.batch_size),
                                lr=float(method.lr), warmup_steps=int(tcfg.warmup_steps),
                                weight_decay=float(tcfg.weight_decay),
                                grad_clip=float(tcfg.grad_clip), seed=int(cfg.seed))
    except ValueError as exc:
        raise GemvlabError(str(exc)) from None
    windows = train_windows(tokenizer, cfg, resources)
    device = next(model.parameters()).device
    memory = _Memory(device)
    bar = tqdm(total=train_cfg.steps, desc=f"{method.name} finetune", unit="step")

    def on_step(step: int, loss: float, lr: float) -> None:
        ctx.tracker.log_step({"train/loss": loss, "train/lr": lr}, step)
        bar.set_postfix(loss=f"{loss:.3f}")
        bar.update()

    memory.start()
    t0 = time.perf_counter()
    result = train(model, windows, train_cfg, on_step)
    train_s = time.perf_counter() - t0
    bar.close()
    done = len(result.losses)
    span = max(1, min(10, done // 3))  # loss_first/loss_final: means over this many steps
    head, tail = result.losses[:span], result.losses[-span:]
    metrics = {
        "adapted_layers": len(layers), "trainable_params": trainable_parameters(model),
        "steps": done, "tokens_trained": done * train_cfg.batch_size * windows.shape[1],
        "train_s": train_s, "diverged": int(result.diverged),
        "train_peak_mem_mb": memory.peak_mb(), "peak_rss_mb_before_train": memory.before,
        "orthogonality_error": max_orthogonality_error(model),
    }
    if done:
        step_ms = statistics.median(result.step_s) * 1e3
        metrics.update(loss_first=sum(head) / len(head), loss_final=sum(tail) / len(tail),
                       step_ms=step_ms, s_per_100_steps=100 * sum(result.step_s) / done)
    if result.diverged:
        log.warning("%s diverged at step %d (non-finite loss or gradient)", method.name, done)
    return metrics


# The training loop's own clock and memory (see training_metrics).
_TRAIN_TIMED = ("train_s", "step_ms", "s_per_100_steps", "train_peak_mem_mb",
                "peak_rss_mb_before_train")


@runner("finetune", "adapters", timed=(*MODEL_RUN_TIMED, *_TRAIN_TIMED))
def finetune(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    from gemvlab.eval.suite import evaluation_metrics
    from gemvlab.finetune.quantized_base import quantize_base
    from gemvlab.models.load import load_run_model

    if cfg.method.kind not in KINDS:
        raise GemvlabError(f"method.kind={cfg.method.kind} is unknown to the finetune stage: "
                           f"use one of {KINDS} (e.g. method=oftv2)")
    resources = Path(cfg.paths.resources)
    t0 = time.perf_counter()
    model, tokenizer = load_run_model(cfg, resources)
    metrics: dict[str, float] = {"load_s": round(time.perf_counter() - t0, 3)}
    base = str(cfg.method.get("base", "none"))
    if base != "none":
        try:
            metrics.update(quantize_base(model, base, list(cfg.method.skip),
                                         int(cfg.method.base_group_size)))
        except ValueError as exc:
            raise GemvlabError(str(exc)) from None
    if cfg.method.kind != "none":
        metrics.update(training_metrics(model, tokenizer, cfg, resources, ctx))
    if metrics.get("diverged"):
        log.warning("no evaluation: the adapters diverged")
    else:
        metrics.update(evaluation_metrics(model, tokenizer, cfg, resources))
    metrics["peak_rss_mb"] = round(max(peak_rss_mb(), metrics.get("peak_rss_mb_before_train", 0)),
                                   1)
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


@runner("bench", "finetune", applies=bench_kind("finetune"), uses_model=False,
        timed=("step/*_ms", "step/*_mem_mb", "ratio/*/time", "ratio/*/memory"),
        needs_gpu=bench_on_cuda, reads=("bench",))
def step_bench(cfg: DictConfig, ctx: StageContext) -> dict[str, float]:
    """One training step per (model, impl), each in its own process; see ``step_bench``."""
    from gemvlab.config import REPO_ROOT
    from gemvlab.finetune.step_bench import benchmark_steps

    bcfg, seed, threads = cfg.bench, int(cfg.seed), cfg.get("threads")
    require_device(bcfg)

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
